"""Block offload: what each mode costs. Two tables.

1. **Plans for the targets** (the pure planner, from the real architectures' parameter sizes built on the meta device):
   the mode and resident blocks ``wanrt.offload.plan_memory`` picks for t2v-1.3B 480P in 6 GiB, t2v-14B 480P in fp8
   in 12 GiB and t2v-14B 720P in bf16 in 24 GiB (text encoder on the host, ``text_encoder_device="cpu"``), with the
   expected peak and bytes moved per step.
2. **Measured** on ``--device``: a DiT with seeded random weights (``bench_dit.build_model``), one batched-CFG forward
   per step (batch 2) at a latent size, per plan (all resident, then block offload with several resident counts):
   s/step, bytes copied per step (counted by the mover), peak memory (``torch.cuda.max_memory_allocated``; on the
   CPU the process's peak resident set, weights and slots alike), and per block the host→device copy time against
   the compute time (is the copy hidden? on CUDA: the copy bandwidth measured beside it).

    python benchmarks/bench_offload.py --quick            # CPU: a small model, the schedule and memory tables
    python benchmarks/bench_offload.py --device cuda --model 1.3b --latent 21 60 104
    python benchmarks/bench_offload.py --device cuda --model 14b --latent 21 60 104 --layers 10
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from common import emit, header, vm_hwm_mb

MODELS = {"1.3b": "t2v-1.3b", "14b": "t2v-14b"}
GIB = 1 << 30


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _meta_sizes(preset_name: str, precision: str, height: int, width: int, frames: int):
    """:class:`PartSizes` of a real preset (meta-device DiT, analytic VAE and activations), text encoder on the host."""
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import WanDiT
    from wanrt.offload import PartSizes
    from wanrt.presets import get_preset
    from wanrt.request import _dit_forward_bytes, memory_terms, resolve_request

    preset = get_preset(preset_name)
    with torch.device("meta"):
        model = WanDiT(dit_config_for(preset))
    eight_bit = precision in ("fp8", "int8")

    def size(module, prefix: str) -> int:
        total = 0
        for name, p in module.named_parameters(prefix=prefix):
            if WanDiT.keep_fp32(name) or p.ndim < 2:
                total += p.numel() * (4 if WanDiT.keep_fp32(name) else 2)
            else:  # a Linear weight: 1 byte + a float32 scale per output channel in 8 bits, else bf16
                total += p.numel() + 4 * p.shape[0] if eight_bit and name.startswith("blocks.") else p.numel() * 2
        return total

    block = size(model.blocks[0], "blocks.0")
    req = resolve_request(preset, "x", seed=0, height=height, width=width, num_frames=frames)
    terms = memory_terms(req, preset, dtype_bytes=2, cfg_batch=True)
    return PartSizes(text_encoder=0, image_encoder=0, vae=254 << 20, dit_other=size(model, "") - block * len(model.blocks),
                     block=block, blocks=len(model.blocks), dit_activations=terms["dit"] + terms["latents"],
                     ffn_hidden=2 * _dit_forward_bytes(req, preset, 2, ffn=False),
                     vae_activations=terms["vae"] + terms["frames"], cfg_samples=2,
                     residual=req.tokens * preset.arch.dim * 8)


def plan_rows() -> list[str]:
    from wanrt.offload import plan_memory

    rows = []
    for name, precision, (h, w), budget in (("t2v-1.3b", "bf16", (480, 832), 6), ("t2v-14b", "fp8", (480, 832), 12),
                                            ("t2v-14b", "bf16", (720, 1280), 24)):
        sizes = _meta_sizes(name, precision, h, w, 81)
        try:
            plan = plan_memory(sizes, budget * GIB)
            ffn = (f"chunks of {plan.ffn_chunk}" if plan.ffn_chunk else "whole") + \
                (", CFG samples one at a time" if plan.microbatch else "")
            rows.append(f"| {name} {precision} {w}x{h}x81 | {budget} | {sizes.dit / GIB:.2f} | {plan.mode} | "
                        f"{plan.resident if plan.mode == 'block' else 'all'} | {ffn} | "
                        f"{plan.peak / GIB:.2f} | {plan.moved_per_step / GIB:.2f} |")
        except ValueError as e:
            rows.append(f"| {name} {precision} {w}x{h}x81 | {budget} | {sizes.dit / GIB:.2f} | infeasible: {e} | | | | |")
    return rows


def measured_rows(a) -> tuple[list[str], str]:
    from bench_dit import build_model

    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import DiTConfig
    from wanrt.offload.mover import BlockMover
    from wanrt.presets import get_preset

    dev = a.device
    if a.quick:
        cfg = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=8, in_dim=16, out_dim=16, text_dim=512)
        latent, dtype, name = tuple(a.latent or (3, 16, 24)), torch.float32, "quick (dim 512, 8 layers, fp32)"
    else:
        cfg = dit_config_for(get_preset(MODELS[a.model]))
        latent, dtype, name = tuple(a.latent or (21, 60, 104)), torch.bfloat16, f"{MODELS[a.model]} bf16"
    if a.layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.out_dim, *latent, generator=g).to(dev)
    ctx = torch.randn(2, 512, cfg.text_dim, generator=g).to(dev, dtype)
    n = cfg.num_layers
    rows = []
    for resident in [n, *sorted({n // 2, 2, 0})]:
        model = build_model(cfg, "cpu", dtype, seed=0)
        for name_, child in model.named_children():
            if name_ != "blocks":
                child.to(dev)
        mover = None
        if resident < n:
            mover = model.offload = BlockMover(model.blocks, torch.device(dev), resident, 2)
        else:
            model.blocks.to(dev)
        model.set_backend("auto")
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(x, 999, ctx)  # warm-up
            _sync(dev)
            moved0 = mover.moved_bytes if mover else 0
            times = []
            for i in range(a.steps):
                t0 = time.perf_counter()
                model(x, 900 - i, ctx)
                _sync(dev)
                times.append(time.perf_counter() - t0)
        per_step = statistics.median(times)
        moved = ((mover.moved_bytes - moved0) / a.steps) if mover else 0
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda") else vm_hwm_mb()
        block_bytes = sum(t.numel() * t.element_size() for t in model.blocks[-1].parameters())
        copy_ms = _copy_ms(block_bytes, dev)
        compute_ms = per_step / n * 1e3
        hidden = "yes" if copy_ms <= compute_ms else "no"
        label = "all resident" if mover is None else f"block offload, {resident} resident + 2 slots"
        rows.append(f"| {label} | {per_step:.3f} | {moved / 2**20:.1f} | {peak:.0f} | {block_bytes / 2**20:.1f} | "
                    f"{copy_ms:.2f} | {compute_ms:.2f} | {hidden if mover else '-'} |")
        del model, mover
    return rows, f"{name}, latent {latent[0]}x{latent[1]}x{latent[2]}, batch 2 (CFG), {n} blocks"


def _copy_ms(nbytes: int, device: str) -> float:
    """Milliseconds to copy ``nbytes`` from (pinned, on CUDA) host memory to ``device``: median of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.startswith("cuda"):
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=list(MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a small model on the CPU")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quick:
        a.device = "cpu"
    rows, what = measured_rows(a)
    bw = ""
    if a.device.startswith("cuda"):
        gbps = (256 << 20) / (_copy_ms(256 << 20, a.device) / 1e3) / 1e9
        bw = f" Measured host→device copy bandwidth (pinned, 256 MiB): {gbps:.1f} GB/s."
    lines = [header("bench_offload", a.device), "",
             "## Plans for the targets (pure planner; text encoder on the host)", "",
             "| model | budget GiB | DiT weights GiB | mode | resident blocks | activations | expected peak GiB | "
             "GiB moved / step |", "|---|---|---|---|---|---|---|---|", *plan_rows(), "",
             f"## Measured: {what}", "",
             f"Median of {a.steps} steps after a warm-up step; one step = one batch-2 forward.{bw}", "",
             "| plan | s/step | MiB moved / step | peak MiB | MiB / block | copy ms / block | compute ms / block | "
             "copy hidden |", "|---|---|---|---|---|---|---|---|", *rows]
    if a.device == "cpu":
        lines += ["", "CPU: host and device are the same memory, so the copies cost time without saving any, and the "
                  "peak column is the process's peak resident set (it only grows); this shows the schedule runs."]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
