"""Offload on a GPU (marker `gpu`; skipped without CUDA): the CUDA branches of the block mover (pinned host copies,
the copy stream, events, the pinned staging ring of disk placement) and the peak memory they save.

On the CPU the same schedule runs with synchronous copies (tests/test_offload.py); here the copies are asynchronous,
so a missing event would show as a wrong video. Awaiting a GPU.
"""

import pytest
import torch

import wanrt
from wanrt.testing import relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OPTS = dict(height=48, width=80, num_frames=9, num_inference_steps=4, seed=3, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_offload_modes_on_cuda_give_the_resident_video(tiny_official, precision):
    """model, block and (bf16) block from disk, against the resident Engine; the same kernels and weights, so the
    same video (1e-6 leaves room for a cuBLAS algorithm picked per allocation)."""
    kw = dict(device="cuda", precision=precision, cuda_graphs=False, cfg_batch=True)
    ref = wanrt.Engine("tiny", tiny_official, **kw).generate("a cat", **OPTS)
    modes = [dict(offload="model"), dict(offload="block")]
    if precision == "bf16":
        modes.append(dict(offload="block", offload_to_disk=True))
    for extra in modes:
        eng = wanrt.Engine("tiny", tiny_official, **kw, **extra)
        for _ in range(2):  # the second run starts from the cycle the first left
            video = eng.generate("a cat", **OPTS)
            rel = relative_error(video.latents, ref.latents)
            assert rel <= 1e-6, f"{extra}: relative error {rel:.3e}"
        mover = eng.transformer.offload
        if extra["offload"] == "model":
            assert eng.transformer.patch_embedding.weight.device.type == "cpu"  # back on the host after the run
        else:
            assert mover.cuda and all(s.is_cuda for s in mover._slots)
            if "offload_to_disk" in extra:
                assert mover.reader.bytes_read > 0 and all(b.is_pinned() for b in mover._staging)
            else:
                assert all(t.is_pinned() for ts in mover._host.values() for t in ts)


def test_block_offload_saves_the_streamed_blocks_memory():
    """A DiT of 8 blocks of 1024 wide in bf16: with 2 resident blocks and 2 slots the peak is at least 3 blocks
    below the resident peak, and the output is the resident one."""
    from wanrt.models.dit import DiTConfig, WanDiT
    from wanrt.offload.mover import BlockMover

    cfg = DiTConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8, in_dim=16, out_dim=16, text_dim=1024)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 16, 24, device="cuda")
    ctx = torch.randn(2, 64, 1024, device="cuda", dtype=torch.bfloat16)
    outs, peaks = [], []
    for resident in (8, 2):
        torch.manual_seed(0)
        model = WanDiT(cfg).to(torch.bfloat16).eval()
        for name, child in model.named_children():
            if name != "blocks":
                child.to("cuda")
        if resident < 8:
            model.offload = BlockMover(model.blocks, torch.device("cuda"), resident, 2)
        else:
            model.blocks.to("cuda")
        model.set_backend("auto")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(x, 500, ctx)  # the second forward starts from the cycle the first left
            outs.append(model(x, 400, ctx).float())
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        block = sum(p.numel() * p.element_size() for p in model.blocks[-1].parameters())
        del model
    assert relative_error(outs[1], outs[0]) <= 1e-6
    assert peaks[1] < peaks[0] - 3 * block, (peaks, block)
