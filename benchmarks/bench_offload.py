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

    python benchmarks/bench_offload.py --quick --host-memory   # CPU: a small model, the schedule and memory tables
    python benchmarks/bench_offload.py --device cuda --model 1.3b --latent 21 60 104 --budget-gb 6
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
    chunk = a.ffn_chunk or (128 if a.quick else 4096)
    plans = [("all resident", n, False, None), ("all resident, CFG samples one at a time", n, True, None),
             (f"all resident, CFG samples one at a time, FFN in chunks of {chunk}", n, True, chunk)]
    plans += [(f"block offload, {r} resident + 2 slots", r, False, None) for r in sorted({n // 2, 2, 0}, reverse=True)]
    if a.budget_gb is not None:
        plan = _budget_plan(cfg, dtype, latent, a.budget_gb)
        plans.append((f"planned for {a.budget_gb:g} GiB: {plan.describe()}", plan.resident if plan.mode == "block"
                      else n, plan.microbatch, plan.ffn_chunk))
    resident_s = None
    for label, resident, micro, ffn_chunk in plans:
        model = build_model(cfg, "cpu", dtype, seed=0)
        for name_, child in model.named_children():
            if name_ != "blocks":
                child.to(dev)
        mover = None
        if resident < n:
            mover = model.offload = BlockMover(model.blocks, torch.device(dev), resident, 2)
        else:
            model.blocks.to(dev)
        model.microbatch = micro
        model.set_ffn_chunk(ffn_chunk)
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
        resident_s = resident_s or per_step  # the first row is all resident
        moved = ((mover.moved_bytes - moved0) / a.steps) if mover else 0
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda") else vm_hwm_mb()
        block_bytes = sum(t.numel() * t.element_size() for t in model.blocks[-1].parameters())
        copy_ms = _copy_ms(block_bytes, dev)
        compute_ms = per_step / n * 1e3
        hidden = "yes" if copy_ms <= compute_ms else "no"
        rows.append(f"| {label} | {per_step:.3f} | {per_step / resident_s:.2f} | {moved / 2**20:.1f} | {peak:.0f} | "
                    f"{block_bytes / 2**20:.1f} | {copy_ms:.2f} | {compute_ms:.2f} | {hidden if mover else '-'} |")
        del model, mover
    return rows, f"{name}, latent {latent[0]}x{latent[1]}x{latent[2]}, batch 2 (CFG), {n} blocks"


def _budget_plan(cfg, dtype, latent, budget_gb: float):
    """The planner's plan for this benchmark's model and latent size within ``budget_gb`` (measured parameter sizes;
    activations from the request the latent size stands for; no encoders, the real VAE's size)."""
    import math

    from wanrt.models.dit import WanDiT
    from wanrt.offload import PartSizes, plan_memory
    from wanrt.presets import get_preset
    from wanrt.request import _dit_forward_bytes, memory_terms, resolve_request

    with torch.device("meta"):
        model = WanDiT(cfg).to(dtype)
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    total = sum(p.numel() * (4 if WanDiT.keep_fp32(k) else dtype.itemsize) for k, p in model.named_parameters())
    preset = get_preset("t2v-1.3b")
    preset = dataclasses.replace(preset, arch=dataclasses.replace(preset.arch, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                                                                  num_heads=cfg.num_heads, num_layers=cfg.num_layers))
    f, h, w = latent
    req = resolve_request(preset, "x", seed=0, height=8 * h, width=8 * w, num_frames=4 * (f - 1) + 1)
    terms = memory_terms(req, preset, dtype_bytes=dtype.itemsize, cfg_batch=True)
    sizes = PartSizes(text_encoder=0, image_encoder=0, vae=254 << 20, dit_other=total - block * cfg.num_layers,
                      block=block, blocks=cfg.num_layers, dit_activations=terms["dit"] + terms["latents"],
                      ffn_hidden=2 * _dit_forward_bytes(req, preset, dtype.itemsize, ffn=False),
                      vae_activations=terms["vae"] + terms["frames"], cfg_samples=2,
                      residual=math.prod(latent) // 4 * cfg.dim * (4 + 2 * dtype.itemsize))
    return plan_memory(sizes, int(budget_gb * GIB))


def host_memory_rows() -> list[str]:
    """The 1.3B-size host-memory probes of ``host_memory.py`` (a 2.8 GB file written to a temporary folder)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    script = str(Path(__file__).with_name("host_memory.py"))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, script, "write", folder], check=True, timeout=900)
        for mode, label in (("block", "block offload, weights in host memory"),
                            ("disk", "block offload from disk (offload_to_disk)")):
            out = subprocess.run([sys.executable, script, mode, folder], check=True, capture_output=True, text=True,
                                 timeout=900).stdout
            g = json.loads(out.strip().splitlines()[-1])
            rows.append(f"| {label} | {g['weights_mib']:.0f} | {g['loaded']['rss'] - g['base']['rss']:.0f} | "
                        f"{g['peak']['rss'] - g['base']['rss']:.0f} | {g['peak']['anon'] - g['base']['anon']:.0f} | "
                        f"{2 * g['block_mib']:.0f} | {g['read'] / 2**30:.2f} |")
    return rows


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
    ap.add_argument("--budget-gb", type=float, default=None, help="add the planner's plan for this budget as a row")
    ap.add_argument("--ffn-chunk", type=int, default=None, help="tokens per FFN chunk in the chunked rows")
    ap.add_argument("--host-memory", action="store_true",
                    help="add the host-memory table (writes a 2.8 GB 1.3B-size checkpoint to a temporary folder)")
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
             f"Median of {a.steps} steps after a warm-up step; one step = one batch-2 forward; × resident: s/step "
             f"against the first row.{bw}", "",
             "| plan | s/step | × resident | MiB moved / step | peak MiB | MiB / block | copy ms / block | "
             "compute ms / block | copy hidden |", "|---|---|---|---|---|---|---|---|---|", *rows]
    if a.device == "cpu":
        lines += ["", "CPU: host and device are the same memory, so the copies cost time without saving any, and the "
                  "peak column is the process's peak resident set (it only grows); this shows the schedule runs."]
    if a.host_memory:
        lines += ["", "## Host memory: a t2v-1.3B-size DiT (bf16, 2.7 GiB of weights), 2 slots, two whole forwards", "",
                  "Growth of this process's resident set (VmRSS: anonymous and file pages) and of its anonymous part "
                  "(RssAnon) over the load and the forwards, each mode in its own process (`host_memory.py`).", "",
                  "| placement | weights MiB | VmRSS after load | VmRSS peak | RssAnon peak | slots MiB | GiB read "
                  "from the file |", "|---|---|---|---|---|---|---|", *host_memory_rows()]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
