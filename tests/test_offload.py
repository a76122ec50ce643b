"""wanrt.offload: the memory planner (pure), the block mover's schedule, and Engines that offload giving the same
videos bit for bit as the resident Engine (CPU: the "device" is host memory too, but every copy, pointer swap and
schedule decision runs as on a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import wanrt
from wanrt.offload import BudgetTooSmall, PartSizes, plan_memory
from wanrt.offload.planner import GIB

MIB = 1 << 20
KW = dict(backend="eager", prompt_cache_size=0)
OPTS = dict(seed=3, num_inference_steps=4, height=48, width=80, num_frames=9)
COEFS = (0.0, 0.0, 0.0, 0.1, 0.0)  # the tiny model skips about every other step (tests/pinned_cases.py)
TEACACHE = dict(teacache_threshold=0.25, teacache_coefficients=COEFS, num_inference_steps=8)


# ------------------------------------------------------------------------------------------------- the planner

# A 14B-like model in bf16: 40 blocks of 0.7 GiB, 1 GiB outside them, an 11 GiB text encoder.
SIZES = PartSizes(text_encoder=11 * GIB, image_encoder=0, vae=250 * MIB, dit_other=1 * GIB, block=700 * MIB,
                  blocks=40, dit_activations=6 * GIB, ffn_hidden=3 * GIB, text_activations=256 * MIB,
                  vae_activations=2 * GIB, workspace=512 * MIB)


def test_planner_takes_the_cheapest_mode_that_fits():
    everything = SIZES.text_encoder + SIZES.vae + SIZES.dit + SIZES.dit_activations + SIZES.workspace
    plan = plan_memory(SIZES, everything)
    assert plan.mode == "none" and plan.peak == everything and plan.moved_per_step == 0
    plan = plan_memory(SIZES, SIZES.dit + SIZES.dit_activations + SIZES.workspace)  # the DiT phase alone fits
    assert plan.mode == "model" and plan.resident == 40 and plan.moved_per_step == 0
    assert plan.placement["dit"] == "gpu while running"


def test_planner_fills_the_budget_with_resident_blocks():
    base = SIZES.dit_other + SIZES.dit_activations + SIZES.workspace  # + (resident + window) blocks
    budget = base + 12 * SIZES.block + SIZES.block // 2
    plan = plan_memory(SIZES, budget)
    assert (plan.mode, plan.resident, plan.window, plan.ffn_chunk) == ("block", 10, 2, None)
    assert plan.moved_per_step == 30 * SIZES.block and plan.peak == base + 12 * SIZES.block <= budget
    assert plan.phases["denoise"] == plan.peak and plan.phases["text"] == SIZES.text_encoder + SIZES.text_activations


def test_planner_chunks_the_ffn_only_when_nothing_else_fits():
    import dataclasses

    sizes = dataclasses.replace(SIZES, text_encoder=2 * GIB)  # an 8-bit text encoder: the DiT phase is the floor
    base = sizes.dit_other + sizes.dit_activations + sizes.workspace + 2 * sizes.block
    assert plan_memory(sizes, base).ffn_chunk is None
    plan = plan_memory(sizes, base - 1)
    assert plan.mode == "block" and plan.ffn_chunk == 4096 and plan.resident == 4  # 3 GiB freed: 4 more blocks


def test_planner_names_the_smallest_feasible_budget():
    with pytest.raises(BudgetTooSmall, match=r"smallest feasible budget is (\d+\.\d\d) GiB") as err:
        plan_memory(SIZES, 2 * GIB)
    minimum = err.value.minimum
    assert minimum == SIZES.text_encoder + SIZES.text_activations  # the text encoder phase is the floor here
    assert plan_memory(SIZES, minimum).peak <= minimum  # and that budget is feasible
    with pytest.raises(BudgetTooSmall):
        plan_memory(SIZES, minimum - 1)


def test_planner_explicit_modes_and_bad_input():
    assert plan_memory(SIZES, mode="block").resident == 0  # no budget: the least memory
    assert plan_memory(SIZES, mode="none").mode == "none"
    with pytest.raises(BudgetTooSmall):
        plan_memory(SIZES, 20 * GIB, mode="none")
    with pytest.raises(ValueError, match="offload must be one of"):
        plan_memory(SIZES, mode="disk")
    with pytest.raises(ValueError, match="window must be >= 2"):
        plan_memory(SIZES, window=1)


# ------------------------------------------------------------------------------------------------- the mover


def _tiny_dit(layers=5):
    import dataclasses

    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import WanDiT
    from wanrt.presets import get_preset

    torch.manual_seed(0)
    cfg = dataclasses.replace(dit_config_for(get_preset("tiny")), num_layers=layers)
    return WanDiT(cfg).eval()


@pytest.mark.parametrize("resident, window", [(0, 2), (1, 2), (2, 3)])
def test_mover_schedule(resident, window):
    """Per forward: each streamed block is copied once; block S[m + k]'s copy is issued before S[m] computes and
    waited on before S[m + k] computes; the output is bit for bit the resident one."""
    from wanrt.offload.mover import BlockMover

    model = _tiny_dit()
    x, ctx = torch.randn(1, 16, 3, 6, 10), torch.randn(1, 20, 64)
    with torch.no_grad():
        ref = [model(x, t, ctx) for t in (900, 500, 100)]
    events, movers = [], []

    def record(event, block, position):
        events.append((event, block, position))
        if event == "compute":  # it computes from a device slot, not from its host copy
            slot = position % window
            assert all(movers[0].slot_of(p) == slot for p in model.blocks[block].parameters()), (block, position)

    model.offload = BlockMover(model.blocks, torch.device("cpu"), resident, window, recorder=record)
    movers.append(model.offload)
    with torch.no_grad():
        out = [model(x, t, ctx) for t in (900, 500, 100)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    streamed = list(range(resident, 5))
    k = window - 1
    order = {ev: i for i, ev in enumerate(events)}
    for p in range(3 * len(streamed)):
        block = streamed[p % len(streamed)]
        compute = order[("compute", block, p)]
        assert order[("wait", block, p)] < compute and order[("issue", block, p)] < compute
        if p + k < 3 * len(streamed):
            assert order[("issue", streamed[(p + k) % len(streamed)], p + k)] < compute
    computes = [i for i, (e, _, _) in enumerate(events) if e == "compute"]
    forwards = [computes[j] for j in range(0, len(computes), len(streamed))]
    for a, b in zip(forwards, forwards[1:]):  # between two forwards' first computes: each block issued once
        issued = [blk for e, blk, _ in events[a:b] if e == "issue"]
        assert sorted(issued) == streamed
    assert not any(blk < resident for e, blk, _ in events)  # resident blocks never move


def test_mover_keeps_one_host_copy_and_reuses_its_slots():
    from wanrt.offload.mover import BlockMover

    model = _tiny_dit()
    before = {id(p) for p in model.blocks.parameters()}
    mover = BlockMover(model.blocks, torch.device("cpu"), 1, 2)
    host = {t.data_ptr() for ts in mover._host.values() for t in ts}
    assert len(mover._slots) == 2 and not any(mover.slot_of(t) is not None for ts in mover._host.values() for t in ts)
    assert mover._slots[0].numel() < mover.block_bytes + 64 * len(mover._host[1])  # one block, aligned
    assert {id(p) for p in model.blocks.parameters()} == before  # the same Parameters, pointing elsewhere
    x, ctx = torch.randn(1, 16, 3, 6, 10), torch.randn(1, 20, 64)
    with torch.no_grad():
        model(x, 500, ctx)
    for b in range(1, 5):  # nothing new was allocated for the weights
        assert all(mover.slot_of(p) is not None or p.data_ptr() in host for p in model.blocks[b].parameters())
    with pytest.raises(ValueError, match="window must be >= 2"):
        BlockMover(model.blocks, torch.device("cpu"), 0, 1)


def test_chunked_ffn_matches_the_whole_ffn():
    model = _tiny_dit(2)
    x, ctx = torch.randn(1, 16, 3, 6, 10), torch.randn(1, 20, 64)
    with torch.no_grad():
        ref = model(x, 500, ctx)
        model.set_ffn_chunk(7)  # 45 tokens: 7 chunks, the last one short
        out = model(x, 500, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # per token; the GEMM's M differs, not the math
    with pytest.raises(ValueError, match="positive int"):
        model.set_ffn_chunk(0)


# ------------------------------------------------------------------------------------------------- the Engine


@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_offloaded_engines_give_the_resident_video_bit_for_bit(preset, precision):
    extra = {"image": np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)} \
        if preset != "tiny" else {}
    opts = {**OPTS, **TEACACHE, **extra}
    ref = wanrt.Engine(preset, precision=precision, cfg_batch=True, **KW).generate("a cat", progress=False, **opts)
    for offload in ("model", "block"):
        eng = wanrt.Engine(preset, precision=precision, cfg_batch=True, offload=offload, **KW)
        video = eng.generate("a cat", progress=False, **opts)
        assert torch.equal(video.latents, ref.latents), offload
        assert np.array_equal(video.frames, ref.frames), offload
        assert video.stats["teacache"] == ref.stats["teacache"] and video.stats["teacache"]["cond"]["skipped"]
        stats = video.stats["offload"]
        assert stats["mode"] == offload and "not captured" in stats["graphed"]
        if offload == "block":  # only computed steps move blocks: one copy of each block per computed forward
            again = eng.generate("a cat", progress=False, **opts)  # (the first run's first copies ran at load)
            assert torch.equal(again.latents, ref.latents)
            forwards = max(again.stats["teacache"][b]["computed"] for b in ("cond", "uncond"))
            assert again.stats["offload"]["moved_bytes"] == \
                forwards * len(eng.transformer.blocks) * eng.transformer.offload.block_bytes


@pytest.mark.parametrize("precision", ["fp8", "int8", "int8-wo"])
def test_block_offload_streams_8_bit_weights(precision):
    """8-bit blocks stream as stored (int8/fp8 weights and their scales): the video is the resident 8-bit one bit
    for bit, and each block moves fewer bytes than in bf16 (the Linears' quarter, plus the float32 norms and
    modulation that stay)."""
    kw = dict(precision=precision, cfg_batch=True, **KW)
    ref = wanrt.Engine("tiny", **kw).generate("a cat", progress=False, **OPTS)
    eng = wanrt.Engine("tiny", offload="block", **kw)
    video = eng.generate("a cat", progress=False, **OPTS)
    assert torch.equal(video.latents, ref.latents)
    mover = eng.transformer.offload
    dtypes = {t.dtype for t in mover._host[0]}
    assert (torch.int8 if precision.startswith("int8") else torch.float8_e4m3fn) in dtypes
    bf16 = wanrt.Engine("tiny", precision="bf16", offload="block", **KW).transformer.offload.block_bytes
    layers = [m for m in eng.transformer.blocks[0].modules() if hasattr(m, "act_backend")]
    saved = sum(m.weight.numel() - 4 * m.out_features for m in layers)  # a byte a weight, plus a float32 scale a row
    assert layers and mover.block_bytes <= bf16 - saved


def test_block_offload_batches_cfg_so_each_block_moves_once_per_step():
    ref = wanrt.Engine("tiny", precision="fp32", cfg_batch=True, **KW).generate("a cat", progress=False, **OPTS)
    eng = wanrt.Engine("tiny", precision="fp32", cfg_batch=False, offload="block", **KW)
    eng.generate("a cat", progress=False, **OPTS)
    video = eng.generate("a cat", progress=False, **OPTS)  # in steady state (the first copies ran at load)
    assert video.stats["cfg_batched"] is True and torch.equal(video.latents, ref.latents)
    assert video.stats["offload"]["moved_bytes"] == \
        OPTS["num_inference_steps"] * len(eng.transformer.blocks) * eng.transformer.offload.block_bytes


def test_engine_budget():
    eng = wanrt.Engine("tiny", precision="fp32", vram_budget_gb=4.0, **KW)
    assert eng.memory_plan.mode == "none" and eng.memory_plan.budget == 4 * GIB
    with pytest.raises(BudgetTooSmall, match=r"smallest feasible budget is 0\.\d\d GiB"):
        wanrt.Engine("tiny", precision="fp32", vram_budget_gb=0.05, **KW)
    with pytest.raises(ValueError, match="offload='auto' needs vram_budget_gb"):
        wanrt.Engine("tiny", offload="auto", **KW)
    with pytest.raises(ValueError, match="offload must be one of"):
        wanrt.Engine("tiny", offload="disk", **KW)
    with pytest.raises(ValueError, match="vram_budget_gb must be a positive number"):
        wanrt.Engine("tiny", vram_budget_gb=-1, **KW)
    with pytest.raises(ValueError, match="offload and shard_weights do not combine"):
        wanrt.Engine("tiny", offload="block", parallel=wanrt.ParallelConfig(ulysses=2, shard_weights=True), **KW)
    eng = wanrt.Engine("tiny", precision="fp32", vram_budget_gb=0.6, **KW)  # just above the 0.5 GiB workspace
    with pytest.raises(ValueError, match="with the placement made for the budget"):
        eng.request("a cat", height=1024, width=1024, num_frames=81)


def test_cli_offload_flags(tmp_path, capsys):
    from wanrt.cli import main
    from wanrt.video import read_mp4

    out = tmp_path / "o.mp4"
    base = ["generate", "--prompt", "a cat", "--height", "48", "--width", "80", "--steps", "2", "--seed", "1",
            "--precision", "fp32", "--device", "cpu", "--no-progress", "-o", str(out)]
    assert main([*base, "--offload", "block"]) == 0
    text = capsys.readouterr().out
    assert "memory: offload block, 0 resident + 2 streaming blocks" in text
    assert read_mp4(out)[0].shape == (9, 48, 80, 3)
    assert main([*base, "--offload", "block", "--offload-to-disk"]) == 0
    assert "memory: offload block" in capsys.readouterr().out
    assert main([*base, "--vram-budget-gb", "0.05"]) == 2
    assert "smallest feasible budget is" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- disk placement


def test_disk_placement_gives_the_resident_video_bit_for_bit():
    kw = dict(precision="bf16", cfg_batch=True, **KW)
    ref = wanrt.Engine("tiny", **kw).generate("a cat", progress=False, **OPTS)
    eng = wanrt.Engine("tiny", offload="block", offload_to_disk=True, **kw)
    video = eng.generate("a cat", progress=False, **OPTS)
    assert torch.equal(video.latents, ref.latents) and np.array_equal(video.frames, ref.frames)
    mover = eng.transformer.offload
    assert mover.reader.bytes_read > 0  # every streamed copy was read from the file
    # the streamed blocks hold no host copy: their tensors are one-element placeholders between copies
    for block in eng.transformer.blocks:
        for p in block.parameters():
            assert mover.slot_of(p) is not None or p.stride() == (0,) * p.dim()
    with pytest.raises(ValueError, match="offload_to_disk streams DiT blocks"):
        wanrt.Engine("tiny", offload="model", offload_to_disk=True, **KW)
    with pytest.raises(ValueError, match="offload_to_disk streams float weights"):
        wanrt.Engine("tiny", offload="block", offload_to_disk=True, precision="int8", **KW)


def test_disk_placement_loads_no_block_until_it_is_placed(tiny_official):
    """``load_transformer(defer_blocks=True)`` reads no block tensor (placeholders of the right shape and dtype, no
    memory); resident blocks are read once when the mover is made; the output is the fully loaded model's bit for
    bit. An Engine whose budget keeps every block resident reads them all at placement."""
    from wanrt.offload.disk import DiskBlocks
    from wanrt.offload.mover import BlockMover

    kw = dict(device="cpu", dtype=torch.bfloat16, backend="eager")
    full = wanrt.load_transformer(tiny_official, **kw)
    lazy = wanrt.load_transformer(tiny_official, defer_blocks=True, **kw)
    for (name, p), q in zip(lazy.named_parameters(), full.parameters(), strict=True):
        assert p.shape == q.shape and p.dtype == q.dtype, name
        if name.startswith("blocks."):
            assert p.stride() == (0,) * p.dim() and p.untyped_storage().nbytes() <= 4, name
        else:
            assert torch.equal(p, q), name
    reader = DiskBlocks(tiny_official)
    lazy.offload = BlockMover(lazy.blocks, torch.device("cpu"), 1, 2, reader=reader)
    assert all(p.is_contiguous() for p in lazy.blocks[0].parameters())  # resident: read, real tensors
    assert reader.bytes_read > 0
    x, ctx = torch.randn(1, 16, 3, 6, 10), torch.randn(1, 20, 64)
    with torch.no_grad():
        for t in (900, 100):
            assert torch.equal(lazy(x, t, ctx), full(x, t, ctx))
    with pytest.raises(ValueError, match="streams float weights"):
        wanrt.load_transformer(tiny_official, defer_blocks=True, quantization="int8", **kw)
    # fp32 stored, fp32 model: read straight into the slot (the bf16 model above went through a rounding cast)
    full32 = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="eager")
    lazy32 = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="eager",
                                    defer_blocks=True)
    lazy32.offload = BlockMover(lazy32.blocks, torch.device("cpu"), 0, 2, reader=DiskBlocks(tiny_official))
    with torch.no_grad():
        assert torch.equal(lazy32(x, 500, ctx), full32(x, 500, ctx))
    # a budget that fits everything: plan "none", every block read from the file at placement
    ref = wanrt.Engine("tiny", precision="bf16", **KW).generate("a cat", progress=False, **OPTS)
    eng = wanrt.Engine("tiny", precision="bf16", vram_budget_gb=4.0, offload_to_disk=True, **KW)
    assert eng.memory_plan.mode == "none" and eng.transformer.offload is None
    assert all(p.is_contiguous() for p in eng.transformer.blocks.parameters())
    assert torch.equal(eng.generate("a cat", progress=False, **OPTS).latents, ref.latents)


def test_disk_placement_names_the_file_when_it_changes_under_it(tmp_path, tiny_official):
    import shutil

    from wanrt.checkpoints.io import CheckpointError
    from wanrt.offload.disk import DiskBlocks
    from wanrt.offload.mover import BlockMover

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_official, folder)
    model = wanrt.load_transformer(folder, device="cpu", dtype=torch.float32, backend="eager", defer_blocks=True)
    (weights,) = folder.glob("*.safetensors")
    from wanrt.offload.disk import safetensors_offsets

    last = max(end for k, (_, _, _, end) in safetensors_offsets(weights).items() if k.startswith("blocks.1."))
    reader = DiskBlocks(folder)
    with open(weights, "r+b") as f:  # truncated inside block 1 while the reader holds it open
        f.truncate(last - 100)
    with pytest.raises(CheckpointError, match=r"short read.*" + weights.name):
        BlockMover(model.blocks, torch.device("cpu"), 0, 2, reader=reader)
    with pytest.raises(CheckpointError, match=weights.name):  # and a new reader refuses the file
        DiskBlocks(folder)


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon")


HOST_MEMORY = Path(__file__).resolve().parents[1] / "benchmarks" / "host_memory.py"


def _host_memory(*args) -> dict | None:
    """``benchmarks/host_memory.py ARGS`` in its own process (resident memory only grows within one)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(HOST_MEMORY), *map(str, args)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]) if args[0] != "write" else None


@pytest.fixture(scope="module")
def dit_1_3b_file(tmp_path_factory):
    """A t2v-1.3B-size DiT checkpoint folder (random weights, bf16 blocks: 2.8 GB), written once per module."""
    folder = tmp_path_factory.mktemp("dit-1.3b")
    _host_memory("write", folder)
    return folder


@pytest.mark.slow
def test_disk_placement_keeps_host_memory_near_the_staging_ring(dit_1_3b_file):
    """The 1.3B-size DiT loaded with its blocks deferred and streamed from disk through 2 slots: the process's
    anonymous memory stays within the embeddings, the staging ring and a margin over the load and whole forwards
    (the file's pages are the page cache's)."""
    got = _host_memory("disk", dit_1_3b_file)
    print("disk placement (MiB):", got)
    assert got["read"] >= 2 * 30 * got["block_mib"] * 2**20 * 0.99  # every block read on each of 2 forwards
    # The load holds the embeddings and head (~80 MiB), not the 2.6 GiB of blocks; over the load and 2 whole
    # forwards the growth is that, the 2 slots (2 x 88 MiB), at most one block tensor in flight (26 MiB) and the
    # activations.
    base, loaded, peak = got["base"]["anon"], got["loaded"]["anon"], got["peak"]["anon"]
    assert loaded - base < got["other_mib"] + 100, got
    assert peak - base < got["other_mib"] + 2 * got["block_mib"] + 250, got
    # nothing is memory-mapped: the resident set (file pages included) stays far below the 2.7 GiB of weights too
    assert got["peak"]["rss"] - got["base"]["rss"] < 2 * got["other_mib"] + 2 * got["block_mib"] + 400, got


@pytest.mark.slow
def test_block_offload_holds_one_host_copy_of_the_weights(dit_1_3b_file):
    """The same DiT loaded into host memory (2.7 GiB) and handed to the mover: the blocks' host copies are the loaded
    tensors themselves (no second copy), so over the load, the mover's setup and whole forwards the process's
    resident memory (anonymous and file pages: bf16 weights stored bf16 stay memory-mapped) grows by one copy of the
    weights, the 2 slots and the activations, not by the weights twice."""
    got = _host_memory("block", dit_1_3b_file)
    print("block offload (MiB):", got)
    assert got["copies"] >= 2 * 30 and got["read"] == 0
    grown = got["peak"]["rss"] - got["base"]["rss"]  # every weight page was touched by the forwards
    assert got["weights_mib"] < grown < got["weights_mib"] + 2 * got["block_mib"] + 300, got


def test_planner_runs_cfg_samples_one_at_a_time_before_chunking_the_ffn():
    import dataclasses

    sizes = dataclasses.replace(SIZES, text_encoder=0, cfg_samples=2, residual=200 * MIB)
    base = sizes.dit_other + sizes.workspace + 2 * sizes.block
    plan = plan_memory(sizes, base + sizes.dit_activations)
    assert not plan.microbatch and plan.ffn_chunk is None
    micro = sizes.dit_activations // 2 + sizes.residual
    plan = plan_memory(sizes, base + micro)
    assert plan.microbatch and plan.ffn_chunk is None and plan.phases["denoise"] == base + micro
    assert "CFG samples one at a time" in plan.describe()
    plan = plan_memory(sizes, base + micro - 1)  # chunking alone frees more (the FFN state of both samples)
    assert not plan.microbatch and plan.ffn_chunk == 4096
    both = micro - sizes.ffn_hidden // 2
    plan = plan_memory(sizes, base + both)  # only the two together fit
    assert plan.microbatch and plan.ffn_chunk == 4096 and plan.peak == base + both


def test_microbatched_blocks_match_the_batch():
    model = _tiny_dit(3)
    x, ctx = torch.randn(2, 16, 3, 6, 10), torch.randn(2, 20, 64)
    with torch.no_grad():
        ref = model(x, torch.tensor([700, 700]), ctx)
        model.microbatch = True
        out = model(x, torch.tensor([700, 700]), ctx)
        single = [model(x[i:i + 1], torch.tensor([700]), ctx[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # per sample: the GEMMs' M differs, not the math
    torch.testing.assert_close(out, torch.cat(single), rtol=1e-5, atol=1e-6)  # each sample as alone
    assert not torch.equal(out[0], out[1])  # (the two samples differ: the test compares something)


def test_engine_plans_microbatching_for_a_tight_budget():
    from wanrt.offload.placement import part_sizes, plan_for

    eng = wanrt.Engine("tiny", precision="fp32", offload="block", **KW)
    req = eng._default_request()
    sizes = part_sizes(eng, req, batched_cfg=True)
    assert sizes.cfg_samples == 2 and sizes.residual > 0
    import dataclasses

    tight = dataclasses.replace(eng.config, vram_budget_gb=(sizes.dit_other + 2 * sizes.block + sizes.workspace
                                                           + sizes.dit_activations // 2 + sizes.residual) / GIB)
    eng.config = tight
    plan = plan_for(eng, req)
    assert plan.microbatch
    ref = wanrt.Engine("tiny", precision="fp32", cfg_batch=True, **KW).generate("a cat", progress=False, **OPTS)
    eng.transformer.microbatch = True
    video = eng.generate("a cat", progress=False, **OPTS)
    assert float((video.latents - ref.latents).norm() / ref.latents.norm()) < 1e-5
