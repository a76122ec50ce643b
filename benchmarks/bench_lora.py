"""LoRA and few-step sampling: what they cost and what they save. Three tables.

1. **Fuse / unfuse** a rank-32 LoRA on every attention and FFN Linear of DiT blocks of the real widths (1.3B: dim
   1536; 14B: dim 5120), bf16 (and ``--precision int8``: dequantize, add, requantize), on ``--device``: seconds for
   the measured blocks and extrapolated to the whole model (the work is per block). Target: < 2 s for 14B on an H100.
2. **Runtime branch** overhead per DiT forward at rank 32 and 128 (one LoRA on every block Linear), against the
   forward without LoRA. Target: <= 5 % at rank 32.
3. **Few-step recipe** end to end (``Engine.generate``): the 4-step distill recipe (timesteps 1000/750/500/250,
   shift 5, CFG off, Euler) against the default 50 steps with CFG, same size.

    python benchmarks/bench_lora.py --quick                      # CPU: small widths, the tiny Engine
    python benchmarks/bench_lora.py --device cuda --layers 4     # real widths, 4 blocks measured
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from common import emit, header

MODELS = {"1.3b": "t2v-1.3b", "14b": "t2v-14b"}


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(dev: str, fn) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _config(name: str, layers: int | None, quick: bool):
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.presets import get_preset

    cfg = dit_config_for(get_preset(MODELS[name]))
    full = cfg.num_layers
    if quick:  # the CPU: a quarter of the width
        cfg = dataclasses.replace(cfg, dim=cfg.dim // 4, ffn_dim=cfg.ffn_dim // 4, num_heads=cfg.num_heads // 4)
    return dataclasses.replace(cfg, num_layers=layers or cfg.num_layers), full


def _lora(model, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA (official keys, with alpha) on every attention and FFN Linear of the blocks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(model.blocks):
        for name, m in block.named_modules():
            if name.startswith(("self_attn.", "cross_attn.", "ffn.")) and hasattr(m, "in_features"):
                key = f"diffusion_model.blocks.{i}.{name}"
                sd[key + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
                sd[key + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
                sd[key + ".alpha"] = torch.tensor(float(rank))
    return sd


def fuse_rows(a) -> list[str]:
    from bench_dit import build_model

    from wanrt.lora import apply_lora
    from wanrt.quant import QuantConfig, quantize_

    rows = []
    for name in ("1.3b", "14b"):
        cfg, full = _config(name, a.layers, a.quick)
        model = build_model(cfg, "cpu", torch.bfloat16, seed=0)
        if a.precision != "bf16":
            quantize_(model, QuantConfig(a.precision, out_dtype=torch.bfloat16))
        model.to(a.device)
        sd = _lora(model, 32)
        apply_lora(model, sd, 1.0, name="warm")  # first use: allocations, kernels
        model.lora.remove()
        fuse = _timed(a.device, lambda m=model: apply_lora(m, sd, 0.8, name="x"))
        restrength = _timed(a.device, lambda m=model: m.lora.set_strengths({"x": 0.5}))
        unfuse = _timed(a.device, lambda m=model: m.lora.remove("x"))
        scale = full / cfg.num_layers
        rows.append(f"| {MODELS[name]} {a.precision} (dim {cfg.dim}) | {cfg.num_layers} of {full} | {fuse:.3f} | "
                    f"{restrength:.3f} | {unfuse:.3f} | {fuse * scale:.2f} | {unfuse * scale:.2f} |")
    return rows


def runtime_rows(a) -> list[str]:
    from bench_dit import build_model

    from wanrt.lora import apply_lora

    cfg, _ = _config(a.model, a.layers, a.quick)
    latent = tuple(a.latent or ((3, 16, 24) if a.quick else (21, 60, 104)))
    model = build_model(cfg, a.device, torch.bfloat16, seed=0)
    model.set_backend("auto")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.out_dim, *latent, generator=g).to(a.device)
    ctx = torch.randn(1, 512, cfg.text_dim, generator=g).to(a.device, torch.bfloat16)

    def forward_s() -> float:
        with torch.no_grad():
            model(x, 900, ctx)
            return statistics.median(_timed(a.device, lambda: model(x, 900, ctx)) for _ in range(a.repeats))

    base = forward_s()
    rows = [f"| none | {base:.4f} | - |"]
    for rank in (32, 128):
        apply_lora(model, _lora(model, rank, seed=rank), 1.0, name=f"r{rank}", mode="runtime")
        t = forward_s()
        rows.append(f"| rank {rank}, runtime | {t:.4f} | {100 * (t / base - 1):+.1f} % |")
        model.lora.remove()
    return rows, f"{MODELS[a.model]}, {cfg.num_layers} blocks (dim {cfg.dim}), latent {'x'.join(map(str, latent))}"


def recipe_rows(a) -> list[str]:
    import wanrt

    eng = wanrt.Engine(a.preset, a.checkpoint, device=a.device, precision="bf16") if a.checkpoint else \
        wanrt.Engine(a.preset, device=a.device, precision="bf16")
    size = dict(height=a.height, width=a.width, num_frames=a.frames, seed=0, progress=False)
    runs = [("default: 50 steps, CFG 5, UniPC", dict(num_inference_steps=50)),
            ("4-step recipe: timesteps 1000/750/500/250, shift 5, CFG off, Euler",
             dict(timesteps=[1000, 750, 500, 250], shift=5.0, guidance_scale=1.0, sample_solver="euler"))]
    eng.generate("warm-up", **{**size, "num_inference_steps": 2})
    rows, first = [], None
    for label, kw in runs:
        t0 = time.perf_counter()
        video = eng.generate("a corgi surfing a wave", **size, **kw)
        total = time.perf_counter() - t0
        first = first or total
        rows.append(f"| {label} | {video.timings['denoise']:.2f} | {total:.2f} | {first / total:.1f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the CPU: a quarter of the widths, the tiny Engine")
    ap.add_argument("--model", choices=list(MODELS), default="1.3b", help="the runtime-branch table's model")
    ap.add_argument("--layers", type=int, default=None, help="blocks measured (default: 2 with --quick, 4 else)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "int8", "fp8"])
    ap.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default=None, help="the recipe table's preset (default: tiny with --quick)")
    ap.add_argument("--checkpoint", default=None, help="its checkpoint folder (not needed for tiny presets)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quick:
        a.device = "cpu"
    a.layers = a.layers or (2 if a.quick else 4)
    a.preset = a.preset or "tiny"
    a.height, a.width, a.frames = a.height or (96 if a.quick else 480), a.width or (160 if a.quick else 832), \
        a.frames or (17 if a.quick else 81)
    runtime, what = runtime_rows(a)
    lines = [header("bench_lora", a.device), "",
             "## Fuse / unfuse a rank-32 LoRA on every block Linear", "",
             "Seconds for the measured blocks, and the whole model extrapolated by its block count." +
             (" CPU, a quarter of the real widths." if a.quick else ""), "",
             "| model | blocks measured | fuse s | new strength s | unfuse s | fuse s, whole model | "
             "unfuse s, whole model |", "|---|---|---|---|---|---|---|", *fuse_rows(a), "",
             f"## Runtime branch per DiT forward ({what}, bf16, median of {a.repeats})", "",
             "| LoRA | s / forward | overhead |", "|---|---|---|", *runtime, "",
             f"## Few-step recipe end to end ({a.preset}, {a.width}x{a.height}, {a.frames} frames)", "",
             "| run | denoise s | total s | speed-up |", "|---|---|---|---|", *recipe_rows(a)]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
