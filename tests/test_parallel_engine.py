"""The Engine under parallel layouts, on spawned gloo groups of 2 and 4 ranks (tiny models, float32, CPU).

Every layout is compared with the single-process Engine on the same request: the guided velocity of one step and
the final latents within 1e-5 relative error, the frames within 1 uint8 level. The test size, 48x80 pixels and 9
frames, gives 3 latent frames of 3x5 tokens: 45 tokens, which divide by neither 2 nor 4, so the padding is always
exercised. TeaCache decisions, cancellation and NaN checks must agree on every rank; a rank that dies or stops
answering makes the others raise RankFailure instead of hanging.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from spawn_group import assert_group_ok, spawn

REL = 1e-5
OPTS = dict(seed=3, num_inference_steps=3, height=48, width=80, num_frames=9)  # 45 tokens
KW = dict(precision="fp32", backend="eager", prompt_cache_size=0)
COEFS = (0.0, 0.0, 0.0, 0.1, 0.0)  # makes the tiny model skip about every other step (as tests/pinned_cases.py)
TEACACHE = dict(num_inference_steps=8, teacache_threshold=0.25, teacache_coefficients=COEFS)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _image():
    return np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)


def _vace_inputs():
    """A VACE request's inputs at the test size: a source video with a mask (inpainting) and a reference image."""
    rng = np.random.default_rng(1)
    mask = np.zeros((9, 48, 80), np.uint8)
    mask[:, 16:32, 16:64] = 255
    return {"video": rng.integers(0, 256, (9, 48, 80, 3), dtype=np.uint8), "mask": mask,
            "reference_images": [_image()]}


def _velocity_error(eng, ref, opts) -> float:
    """One guided step's velocity of the parallel Engine against the single-process GuidedStep."""
    from wanrt.parallel import runner
    from wanrt.sampling.loop import GuidedStep

    req = ref.request("a cat", **opts)
    cond, uncond = eng.text(req)
    x = torch.randn(req.latent_shape, generator=torch.Generator().manual_seed(11))
    step, _ = runner.make_step(eng.dit, eng.mesh, cond, uncond, req.guidance_scale, batch_cfg=False,
                               teacache_config=None, num_steps=req.num_inference_steps, graphs=None, image_cond={},
                               device=torch.device("cpu"))
    v = step(x, 937, 0).clone()
    v_ref = GuidedStep(ref.transformer, cond, uncond, req.guidance_scale)(x, 937, 0)
    return _rel(v, v_ref)


def _compare(eng, ref_video, video, what: str) -> dict:
    """Check a parallel run against the single-process one; return what every rank must agree on (numpy arrays, no
    tensors: a tensor would travel to the test process through a shared-memory handle of a rank that may be gone)."""
    rel = _rel(video.latents, ref_video.latents)
    assert rel < REL, f"{what}: final latents rel {rel:.2e}"
    if video.frames is not None:
        diff = int(np.abs(video.frames.astype(int) - ref_video.frames.astype(int)).max())
        assert diff <= 1, f"{what}: frames differ by {diff} levels"
    stats = {k: v for k, v in video.stats.items() if k not in ("parallel", "offload")}
    if "offload" in video.stats:  # the plan differs (this rank's share of the activations); the moves do not
        got, want = video.stats["offload"], ref_video.stats["offload"]
        assert (got["mode"], got["moved_bytes"]) == (want["mode"], want["moved_bytes"]), what
        stats["offload"] = {"mode": got["mode"], "moved_bytes": got["moved_bytes"]}
        ref_video = _without_offload_plan(ref_video)
        if eng.mesh.config.cfg > 1:  # block offload batches CFG in one process; CFG parallel splits the branches
            assert ref_video.stats["cfg_batched"] and not stats["cfg_batched"], what
            stats["cfg_batched"] = True
    par = {k: v for k, v in video.stats["parallel"].items() if k != "rank"}
    assert stats == ref_video.stats, what  # steps, CFG batching, TeaCache decisions, image conditioning
    return {"what": what, "rel": rel, "seed": video.seed, "fps": video.fps, "latents": video.latents.numpy().copy(),
            "stats": stats, "parallel": par, "has_frames": video.frames is not None,
            "frames": None if video.frames is None else video.frames.copy()}


def _without_offload_plan(video):
    """``video`` with its stats' offload entry reduced to the mode and the bytes moved."""
    import dataclasses

    stats = dict(video.stats)
    stats["offload"] = {k: stats["offload"][k] for k in ("mode", "moved_bytes")}
    return dataclasses.replace(video, stats=stats)


def _run_layouts(rank, cases, world=2) -> list[dict]:
    import wanrt

    notes, refs = [], {}
    for what, layout, preset, engine_opts, opts in cases:
        key = (preset, tuple(sorted(engine_opts.items())), tuple(sorted((k, str(v)) for k, v in opts.items())))
        if key not in refs:
            ref_engine = wanrt.Engine(preset, **{**KW, **engine_opts})
            refs[key] = (ref_engine, ref_engine.generate("a cat", progress=False, **opts))
        ref_engine, ref_video = refs[key]
        eng = wanrt.Engine(preset, parallel=layout, **{**KW, **engine_opts})
        assert eng.plan.attention == engine_opts.get("backend", "eager")
        assert eng.parallel == layout
        video = eng.generate("a cat", progress=False, **opts)
        note = _compare(eng, ref_video, video, what)
        if "offload" in engine_opts:  # planned for this rank's share of the activations
            assert eng.memory_plan.phases["denoise"] < ref_engine.memory_plan.phases["denoise"], what
            assert eng.memory_plan.mode == engine_opts["offload"], what
        if layout.shard_weights:  # after the run every sharded Linear holds its shard only (resharded)
            from torch.distributed.tensor import DTensor

            for dit in (eng.transformer, eng.transformer_2 or eng.transformer):  # (A14B: both experts)
                q = dit.blocks[0].self_attn.q.weight
                assert isinstance(q, DTensor) and q.to_local().shape[0] == q.shape[0] // world, what
        if "teacache_threshold" in opts:  # the decisions: equal on every rank and to the single process
            assert video.stats["teacache"] == ref_video.stats["teacache"], what
            tc = video.stats["teacache"]
            assert tc.get("high", tc)["cond"]["skipped"] > 0, what  # (A14B: per expert)
        if preset == "tiny" and "teacache_threshold" not in opts:
            note["velocity_rel"] = _velocity_error(eng, ref_engine, opts)
            assert note["velocity_rel"] < REL, f"{what}: velocity rel {note['velocity_rel']:.2e}"
        notes.append(note)
    return notes


def _assert_ranks_agree(outcome, world):
    """Every rank returned the same Video metadata and latents; frames on rank 0 (or everywhere when asked)."""
    assert_group_ok(outcome, world)
    per_rank = [outcome[r][1] for r in range(world)]
    for notes in zip(*per_rank, strict=True):
        first = notes[0]
        for r, n in enumerate(notes):
            assert n["what"] == first["what"]
            assert (n["seed"], n["fps"], n["stats"], n["parallel"]) == \
                (first["seed"], first["fps"], first["stats"], first["parallel"]), (first["what"], r)
            assert np.array_equal(n["latents"], first["latents"]), (first["what"], r)
            all_ranks = "frames_on_all_ranks" in first["what"]
            assert n["has_frames"] == (r == 0 or all_ranks), (first["what"], r)
            if all_ranks:
                assert np.array_equal(n["frames"], first["frames"])


# --------------------------------------------------------------------------------------------------- 2 ranks


def _two_rank_cases(group: str) -> list:
    from wanrt import ParallelConfig as P

    return {
        "ulysses": [
            ("ulysses 2", P(ulysses=2), "tiny", {}, OPTS),
            ("ulysses 2, batched CFG", P(ulysses=2), "tiny", {"cfg_batch": True}, OPTS),
            ("i2v ulysses 2", P(ulysses=2), "tiny-i2v", {}, {**OPTS, "image": _image()}),
            ("vace ulysses 2", P(ulysses=2), "tiny-vace", {}, {**OPTS, **_vace_inputs()}),
        ],
        "ring": [
            ("ring 2", P(ring=2), "tiny", {}, OPTS),
            ("ring 2, guidance 1", P(ring=2), "tiny", {}, {**OPTS, "guidance_scale": 1.0}),
            ("i2v ring 2", P(ring=2), "tiny-i2v", {}, {**OPTS, "image": _image()}),
            ("vace ring 2", P(ring=2), "tiny-vace", {}, {**OPTS, **_vace_inputs()}),
        ],
        "cfg": [
            ("cfg 2", P(cfg=2), "tiny", {}, OPTS),
            ("cfg 2, guidance 1", P(cfg=2), "tiny", {}, {**OPTS, "guidance_scale": 1.0}),
            ("teacache cfg 2", P(cfg=2), "tiny", {}, {**OPTS, **TEACACHE}),
        ],
        "shard": [
            ("shard_weights, ulysses 2, frames_on_all_ranks",
             P(ulysses=2, shard_weights=True, frames_on_all_ranks=True), "tiny", {}, OPTS),
            ("teacache ulysses 2", P(ulysses=2), "tiny", {}, {**OPTS, **TEACACHE}),
        ],
        "offload": [
            ("ulysses 2, block offload", P(ulysses=2), "tiny", {"offload": "block"}, OPTS),
            ("teacache cfg 2, block offload", P(cfg=2), "tiny", {"offload": "block"}, {**OPTS, **TEACACHE}),
            ("i2v ring 2, model offload", P(ring=2), "tiny-i2v", {"offload": "model"}, {**OPTS, "image": _image()}),
            ("vace cfg 2, block offload", P(cfg=2), "tiny-vace", {"offload": "block"}, {**OPTS, **_vace_inputs()}),
        ],
        "a14b": [  # Wan2.2 A14B: both experts under each layout (3 steps: 2 high-noise, 1 low-noise)
            ("a14b ulysses 2", P(ulysses=2), "tiny-a14b", {}, OPTS),
            ("a14b cfg 2", P(cfg=2), "tiny-a14b", {}, {**OPTS, "guidance_scale_2": 1.0}),
            ("a14b teacache ring 2", P(ring=2), "tiny-a14b", {},
             {**OPTS, **TEACACHE, "teacache_coefficients": {"high": COEFS, "low": COEFS}}),
            ("a14b shard_weights", P(ulysses=2, shard_weights=True), "tiny-a14b", {}, OPTS),
            ("ti2v ulysses 2 (per-token timesteps)", P(ulysses=2), "tiny-ti2v", {},
             {**OPTS, "height": 64, "width": 96, "image": _image()}),
        ],
        "triton": [
            ("ring 2, Triton kernels (log-sum-exp from the kernel)", P(ring=2), "tiny", {"backend": "triton"},
             {**OPTS, "num_inference_steps": 1}),
        ],
    }[group]


def _body_layouts_two(group, rank, world):
    return _run_layouts(rank, _two_rank_cases(group))


@pytest.mark.parametrize("group", ["ulysses", "ring", "cfg", "shard", "offload", "triton", "a14b"])
def test_two_rank_layouts_match_one_process(group):
    import functools

    outcome = spawn(2, functools.partial(_body_layouts_two, group), deadline_s=300.0)
    _assert_ranks_agree(outcome, 2)


class CopyCapturer:
    """A CPU stand-in for CUDA-graph capture that checks the wiring only: ``capture(fn)`` calls ``fn`` once and keeps
    its outputs; ``replay()`` calls ``fn`` again and copies the new outputs into the kept ones (collectives run
    again, as a CUDA graph replays its NCCL kernels)."""

    def capture(self, fn):
        first = fn()

        def replay():
            new = fn()
            for kept, fresh in zip(_flat(first), _flat(new), strict=True):
                kept.copy_(fresh)

        return replay


def _flat(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def _body_agreement(rank, world):
    """Cancel and NaN on one rank stop every rank at the same step."""
    import threading

    import wanrt
    from wanrt.parallel.mesh import build_mesh
    from wanrt.parallel.step import RankSync
    from wanrt.request import Cancelled
    from wanrt.sampling.loop import denoise
    from wanrt.sampling.schedulers import make_solver

    notes = {}
    eng = wanrt.Engine("tiny", parallel=wanrt.ParallelConfig(ulysses=2), **KW)
    for how in ("callback", "event"):
        event = threading.Event()

        def callback(i, n, x, event=event, how=how):
            if rank == 1 and i == 1:
                if how == "event":
                    event.set()
                else:
                    return False

        with pytest.raises(Cancelled) as info:
            eng.generate("a cat", progress=False, callback=callback, cancel=event, **{**OPTS, "num_inference_steps": 5})
        notes[how] = info.value.step
    with pytest.raises(ValueError, match="calibration runs in one process"):
        eng.calibrate_teacache("a cat", **{**OPTS, "num_inference_steps": 6})
    if rank == 1:  # the text encoder lives on rank 0 only
        assert eng.text_encoder is None
        with pytest.raises(RuntimeError, match="rank 0 only"):
            eng.encode_prompt(["a cat"])
    # A cancel already set before the first step, on rank 0 only.
    event = threading.Event()
    if rank == 0:
        event.set()
    with pytest.raises(Cancelled) as info:
        eng.generate("a cat", progress=False, cancel=event, **OPTS)
    notes["before"] = info.value.step

    mesh = build_mesh(wanrt.ParallelConfig(ring=2), 2)
    sync = RankSync(mesh, torch.device("cpu"))

    def step(x, t, i):
        v = torch.zeros_like(x)
        if rank == 1 and i == 2:
            v[0, 0, 0, 0, 0] = float("nan")
        return v

    with pytest.raises(FloatingPointError, match="step 2"):
        denoise(step, make_solver("unipc", 5, 5.0), torch.zeros(1, 16, 3, 6, 10), sync=sync)
    notes["nan_syncs"] = sync.calls

    # TeaCache: the ranks follow the first rank's decisions even where their own would differ (here rank 1's
    # threshold 0 would compute every step).
    from wanrt.cache.teacache import TeaCache, TeaCacheConfig
    from wanrt.parallel.step import teacache_agreement

    config = TeaCacheConfig(threshold=0.25 if rank == 0 else 0.0, coefficients=COEFS)
    cache = TeaCache(config, 8, branches=("cond",), agree=teacache_agreement(mesh, torch.device("cpu")))
    gen = torch.Generator().manual_seed(3)
    for i in range(8):
        e = torch.randn(1, 16, generator=gen) * 0.01 + 1.0  # small changes: rank 0 skips some steps
        if cache.should_compute("cond", i, e):
            cache.store("cond", torch.zeros(1, 4))
    notes["teacache"] = cache.stats["cond"]

    # The step graphs wrap the sequence-parallel DiT (its collectives inside): replayed, they give the same video.
    from wanrt.sampling.loop import make_step_graphs

    import wanrt.sampling.loop as loop
    from wanrt.config import EngineConfig
    from wanrt.parallel.dit import SeqParallelAttention

    ref = wanrt.Engine("tiny", **KW).generate("a cat", progress=False, **OPTS)
    # The Engine's own wiring, with graphs forced on and captured by the stand-in.
    EngineConfig.use_cuda_graphs = property(lambda self: True)
    loop.make_step_graphs = lambda model, max_graphs=4, capturer=None: make_step_graphs(model, max_graphs,
                                                                                          CopyCapturer())
    eng = wanrt.Engine("tiny", parallel=wanrt.ParallelConfig(ulysses=2), **KW)
    assert eng._graphs is not None
    calls, original = [], SeqParallelAttention.__call__
    SeqParallelAttention.__call__ = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        video = eng.generate("a cat", progress=False, **OPTS)
    finally:
        SeqParallelAttention.__call__ = original
    layers = len(eng.transformer.blocks)
    assert len(calls) == layers * (2 * OPTS["num_inference_steps"] + 1), len(calls)  # capture + branches x steps
    assert _rel(video.latents, ref.latents) < REL
    graphs = video.stats["cuda_graphs"]["plain"]
    assert graphs["captures"] == 1 and graphs["replays"] == 2 * OPTS["num_inference_steps"] - 1, graphs  # 2 branches
    assert video.stats["parallel"]["cuda_graphs_capture_collectives"] is True
    return notes


def test_cancel_and_nan_stop_every_rank_at_the_same_step():
    outcome = spawn(2, _body_agreement, deadline_s=180.0)
    assert_group_ok(outcome, 2)
    teacache = outcome[0][1].pop("teacache")
    assert teacache["skipped"], teacache  # rank 0 skipped steps; rank 1, deciding alone, would have skipped none
    assert outcome[1][1].pop("teacache") == teacache
    for r in range(2):
        assert outcome[r][1] == {"callback": 1, "event": 1, "before": -1, "nan_syncs": 4}, outcome[r][1]


def _body_rank_dies(rank, world):
    import wanrt
    from wanrt.distributed import RankFailure

    eng = wanrt.Engine("tiny", parallel=wanrt.ParallelConfig(ulysses=2), **KW)

    def callback(i, n, x):
        if rank == 1 and i == 1:
            os._exit(3)  # the process dies mid-run, without a word

    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 0 of 2: .* failed; another rank failed"):
        eng.generate("a cat", progress=False, callback=callback, **{**OPTS, "num_inference_steps": 6})
    return {"seconds": time.monotonic() - start}


def test_a_rank_that_dies_makes_the_others_fail_not_hang():
    outcome = spawn(2, _body_rank_dies, deadline_s=120.0, timeout_s=20.0, expect_exit=(1,))
    assert_group_ok(outcome, 2)
    assert outcome[1][1] == {"exitcode": 3}
    assert outcome[0][1]["seconds"] < 20.0  # a closed connection is seen at once, before the timeout


def _body_rank_stalls(rank, world):
    import wanrt
    from wanrt.distributed import RankFailure

    eng = wanrt.Engine("tiny", parallel=wanrt.ParallelConfig(cfg=2), **KW)

    def callback(i, n, x):
        if rank == 1 and i == 0:
            time.sleep(8.0)  # stops answering for longer than the 3 s collective timeout

    start = time.monotonic()
    with pytest.raises(RankFailure):
        eng.generate("a cat", progress=False, callback=callback, **OPTS)
    return {"seconds": time.monotonic() - start}


def test_a_rank_that_stalls_makes_the_others_fail_after_the_timeout():
    outcome = spawn(2, _body_rank_stalls, deadline_s=120.0, timeout_s=3.0)
    assert_group_ok(outcome, 2)
    assert 2.5 < outcome[0][1]["seconds"] < 30.0


# --------------------------------------------------------------------------------------------------- 4 ranks


def _body_layouts_four(rank, world):
    import wanrt
    from wanrt import ParallelConfig as P

    from wanrt.checkpoints.tiny import cached_tiny_checkpoint

    fixture = cached_tiny_checkpoint("official", "tiny")  # the random dim-64 fixture: 2 heads
    with pytest.raises(ValueError, match=r"2 heads do not divide by ulysses 4.*ulysses 2 x ring 2"):
        wanrt.Engine("tiny", fixture, parallel=P(ulysses=4), **KW)
    with pytest.raises(ValueError, match="world size is 4"):
        wanrt.Engine("tiny", parallel=P(ulysses=2), **KW)
    cases = [
        ("ulysses 2 x ring 2", P(ulysses=2, ring=2), "tiny", {}, OPTS),
        ("ring 4", P(ring=4), "tiny", {}, OPTS),
        ("cfg 2 x ulysses 2", P(cfg=2, ulysses=2), "tiny", {}, OPTS),
        ("cfg 2 x ring 2 shard_weights", P(cfg=2, ring=2, shard_weights=True), "tiny", {}, OPTS),
        ("i2v cfg 2 x ulysses 2", P(cfg=2, ulysses=2), "tiny-i2v", {}, {**OPTS, "image": _image()}),
        ("teacache ulysses 2 x ring 2", P(ulysses=2, ring=2), "tiny", {}, {**OPTS, **TEACACHE}),
    ]
    notes = _run_layouts(rank, cases, world)
    eng = wanrt.Engine("tiny", parallel="auto", **KW)
    assert eng.parallel == P(cfg=2, ulysses=2)  # CFG first, then Ulysses over the heads
    return notes


def test_four_rank_layouts_match_one_process():
    outcome = spawn(4, _body_layouts_four, deadline_s=420.0)
    _assert_ranks_agree(outcome, 4)


def _body_vae(rank, world):
    from wanrt.checkpoints.loaders import load_vae
    from wanrt.checkpoints.tiny import cached_tiny_checkpoint
    from wanrt.models.vae_tiling import TilingConfig, decode_tiled
    from wanrt.parallel import ParallelConfig
    from wanrt.parallel.mesh import build_mesh
    from wanrt.parallel.vae import decode_tiled_parallel

    vae = load_vae(cached_tiny_checkpoint("official", "tiny"), device="cpu", dtype=torch.float32)
    mesh = build_mesh(ParallelConfig(ring=world), 2)
    lat = torch.randn(1, 16, 3, 9, 13, generator=torch.Generator().manual_seed(5))
    config = TilingConfig(tile_latent=4, overlap_latent=1)
    out = decode_tiled_parallel(vae, lat, mesh, config)
    one = decode_tiled_parallel(vae, lat[:, :, :, :3, :3], mesh, TilingConfig(tile_latent=4, overlap_latent=1))
    if rank != 0:
        assert out is None and one is None
        return None
    ref = decode_tiled(vae, lat, config)
    assert torch.equal(out, ref), float((out - ref).abs().max())  # bit for bit
    assert torch.equal(one, decode_tiled(vae, lat[:, :, :, :3, :3], config))  # a single tile: rank 0 alone
    return None


def test_parallel_tiled_vae_decode_is_bitwise_the_single_process_one():
    outcome = spawn(4, _body_vae, deadline_s=180.0)
    assert_group_ok(outcome, 4)


# --------------------------------------------------------------------------------------------------- in process


def test_engine_refuses_a_layout_without_a_process_group():
    import torch.distributed as dist

    import wanrt

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"wanrt.distributed.init\(\).*--nproc"):
        wanrt.Engine("tiny", parallel=wanrt.ParallelConfig(ulysses=2), **KW)
    with pytest.raises(RuntimeError, match="torchrun"):
        wanrt.Engine("tiny", parallel="auto", **KW)


@pytest.mark.parametrize("bad", ["ulysses", 2, {"ulysses": 2}, True])
def test_engine_config_rejects_a_bad_parallel_value(bad):
    import wanrt

    with pytest.raises(ValueError, match="parallel must be None, 'auto' or a wanrt.ParallelConfig"):
        wanrt.EngineConfig(torch.device("cpu"), parallel=bad)


def test_resolve_layout():
    from wanrt.parallel.config import ParallelConfig, resolve_layout

    assert resolve_layout("auto", 8, 12, True) == ParallelConfig(ulysses=4, cfg=2)
    assert resolve_layout("auto", 8, 12, False) == ParallelConfig(ulysses=4, ring=2)
    assert resolve_layout("auto", 8, 40, True) == ParallelConfig(ulysses=4, cfg=2)
    with pytest.raises(ValueError, match="12 heads do not divide by ulysses 8.*ulysses 4 x ring 2"):
        resolve_layout(ParallelConfig(ulysses=8), 8, 12, True)
    with pytest.raises(ValueError, match="parallel must be"):
        resolve_layout("yes", 8, 12, True)


# --------------------------------------------------------------------------------------------------- command line


def _cli(args, cwd, env_extra=None):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "wanrt", "generate", "--prompt", "a cat", "--height", "48", "--width",
                           "80", "--steps", "2", "--seed", "5", "--precision", "fp32", "--backend", "eager",
                           "--device", "cpu", "--no-progress", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=240)


def test_cli_nproc_runs_torchrun_and_rank_0_alone_writes(tmp_path):
    from wanrt.video import read_mp4

    # lossless MP4s (--crf 0): the codec's own decisions would amplify a float32 rounding difference
    one = _cli(["-o", "one.mp4", "--crf", "0"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _cli(["--nproc", "2", "--ring", "2", "-o", "two.mp4", "--crf", "0"], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1 and "ulysses 1 x ring 2 x cfg 1 (2 ranks) (gloo)" in two.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "two.mp4"]  # no .part, no second writer
    a, _ = read_mp4(tmp_path / "one.mp4")
    b, _ = read_mp4(tmp_path / "two.mp4")
    assert a.shape == b.shape == (9, 48, 80, 3)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())  # frames within float32 rounding


def test_cli_parallel_errors_are_one_line_with_exit_codes(tmp_path):
    r = _cli(["--ulysses", "2", "-o", "x.mp4"], tmp_path)  # a layout, no torchrun
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli(["--nproc", "2", "--ulysses", "4", "-o", "x.mp4"], tmp_path)  # a layout of 4 ranks on 2
    assert r.returncode == 2, r.stderr
    import re

    assert re.search(r"rank [01](, 1)? failed \(exit code [^)]*\b2\b", r.stderr), r.stderr  # the launcher stops the other
    assert "= 4 ranks, but the world size is 2" in r.stderr and "Valid layouts for 2 ranks" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


# --------------------------------------------------------------------------------------------------- benchmark


def test_bench_parallel_counts_what_its_formula_says(tmp_path):
    """benchmarks/bench_parallel.py under torchrun (2 gloo ranks): a table row per layout, and the bytes counted at
    the collectives equal the analytic formula of each layout (a 3x6x10 latent: 45 tokens, padded to 46; sharded
    weights included)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"
    out = tmp_path / "table.md"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(bench), "--quick", "--latent", "3", "6", "10", "--steps", "1", "--layouts", "u2r1c1",
                        "u1r2c1", "u1r1c2", "u2r1c1s", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=240, cwd=bench.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ulysses")]
    assert [row[0].strip() for row in rows] == ["ulysses 2 x ring 1 x cfg 1", "ulysses 1 x ring 2 x cfg 1",
                                                "ulysses 1 x ring 1 x cfg 2", "ulysses 2 x ring 1 x cfg 1 + shard_weights"]
    for row in rows:
        counted, formula = float(row[5]), float(row[6])
        assert counted > 0 and counted == formula, row


# --------------------------------------------------------------------------------------------------- GPUs (NCCL)


def _body_nccl(rank, world):
    """On 2 GPUs with NCCL: each two-rank layout against one GPU, fp32 eager (exact) and bf16 with the default
    kernels and CUDA graphs (the collectives captured)."""
    import wanrt
    from wanrt import ParallelConfig as P

    notes = []
    for kw, bound in ((dict(precision="fp32", backend="eager", cuda_graphs=False), REL),
                      (dict(precision="bf16", cuda_graphs=True), 1e-2)):
        ref = wanrt.Engine("tiny", prompt_cache_size=0, **kw).generate("a cat", progress=False, **OPTS)
        for layout in (P(ulysses=2), P(ring=2), P(cfg=2), P(ulysses=2, shard_weights=True)):
            eng = wanrt.Engine("tiny", parallel=layout, prompt_cache_size=0, **kw)
            video = eng.generate("a cat", progress=False, **OPTS)
            rel = _rel(video.latents, ref.latents)
            assert rel < bound, (layout, kw, rel)
            notes.append((str(layout), kw["precision"], rel, video.stats.get("cuda_graphs")))
    return notes


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_two_ranks_on_nccl_match_one_gpu():
    outcome = spawn(2, _body_nccl, deadline_s=400.0, timeout_s=120.0, backend="nccl")
    assert_group_ok(outcome, 2)
