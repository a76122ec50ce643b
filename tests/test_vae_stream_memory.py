"""Streaming decode keeps peak memory independent of the number of frames (tiny Wan-like VAE on the CPU).

Memory is measured as the peak of live tensor storages created during the decode (``TensorMemoryTracker``):
deterministic, unlike the process RSS, whose allocator noise on the CPU is larger than a tiny decode.
"""

from __future__ import annotations

import torch

from wanrt.checkpoints.tiny import randomize_
from wanrt.models.vae import VAEConfig, WanVAE
from wanrt.testing import TensorMemoryTracker


def _peak(vae, latent_frames: int, stream: bool) -> tuple[int, float]:
    z = torch.randn(1, 16, latent_frames, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), TensorMemoryTracker() as m:
        if stream:
            n = sum(chunk.shape[2] for chunk in vae.decode_stream(z))  # each chunk dropped once counted
        else:
            n = vae.decode(z).shape[2]
    return n, m.peak_bytes / 2**20


def test_streaming_decode_memory_does_not_grow_with_frames():
    vae = WanVAE(VAEConfig(base_dim=8, num_res_blocks=1)).eval()
    randomize_(vae, seed=0)
    (n_short, short), (n_long, long) = _peak(vae, 3, True), _peak(vae, 11, True)
    assert (n_short, n_long) == (9, 41)
    _, one_shot = _peak(vae, 11, False)
    print(f"peak live tensors: streaming {short:.2f} MiB (9 frames) vs {long:.2f} MiB (41 frames); "
          f"one-shot 41 frames {one_shot:.2f} MiB")
    # 32 more output frames of 3x96x96 fp32 are 3.4 MiB: a one-shot decode holds them, a stream must not.
    assert long - short < 0.25, f"streaming peak grew by {long - short:.2f} MiB"
    assert one_shot - long > 3, "the one-shot decode should hold all its frames (the measurement must see it)"


def test_tracker_counts_live_storages():
    with TensorMemoryTracker() as m:
        a = torch.zeros(1024)  # 4 KiB
        b = a.view(32, 32)  # a view shares the storage: not counted twice
        c = torch.ones(2048)  # 8 KiB
        del c
        d = torch.ones(256)  # 1 KiB
    assert m.peak_bytes == 12 * 1024
    assert m.live_bytes == 5 * 1024
    del a, b, d
