"""Whole-DiT forward per backend: milliseconds, TFLOP/s and peak memory of one Wan2.1 DiT forward.

Builds a t2v DiT (1.3B, or 14B with ``--model 14b``; ``--layers N`` keeps the first N blocks) on the
meta device, gives its parameters their dtypes there (bf16, except the ``WanDiT.keep_fp32`` ones,
float32), materialises it directly on the device (``to_empty``) and fills it with seeded random
weights on the device (the scheme of ``wanrt.checkpoints.tiny.randomize_``), so the 28.6 GB of the
14B model are never built in float32 or on the host. Then one forward ``model(x, t, context)`` at
480x832x81 (latent 16x21x60x104, 32,760 tokens, 512 text tokens, batch 1, no CFG) per backend plan:

* ``eager``: the reference path (float32 chunked attention, float64 RoPE, unfused norms);
* ``sdpa`` and ``triton`` attention, each with the eager and with the Triton fused ops (QK-norm +
  RoPE, modulated LayerNorm, gated residuals), to separate the two effects;
* ``flash-attn``, ``sageattention``, ``xformers`` (with the Triton fused ops) when installed and
  eligible (``probe_capabilities`` + ``ineligibility``).

Times are medians of ``--repeats`` forwards after one warm-up forward (which compiles and autotunes
the Triton kernels), synchronised ``time.perf_counter`` (a forward is long: no L2 concerns).
TFLOP/s use :func:`dit_flops` (docs/model-reference.md §11.1); peak memory is
``torch.cuda.max_memory_allocated`` over that backend's forwards, weights included. The error
column is ``‖out − out_eager‖ / ‖out_eager‖`` of the velocity.

``--quick``: a tiny config (dim 64, 2 heads, 2 layers, float32) on the CPU, eager and sdpa
(``--interpret`` adds the Triton paths in Triton's CPU interpreter).

    python benchmarks/bench_dit.py --quick
    python benchmarks/bench_dit.py --device cuda --out benchmarks/results/dit_H100_1.3b_480p.md
    python benchmarks/bench_dit.py --device cuda --model 14b --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch
from common import default_peak, emit, header, settle_device_args, vm_hwm_mb

MODELS = {"1.3b": "t2v-1.3b", "14b": "t2v-14b"}


def dit_flops(cfg, latent: tuple[int, int, int], text_tokens: int = 512) -> float:
    """FLOPs of one DiT forward, batch 1 (docs/model-reference.md §11.1).

    With L = F·(H/ph)·(W/pw) video tokens, d = dim, T = text tokens, per block:

    * linear: 2·L·(6d² + 2d·ffn): q, k, v, o of self-attention and q, o of cross-attention
      (6 d×d GEMMs) and the two FFN GEMMs;
    * cross-attention K/V: 2·T·2d² (the k and v projections of the text tokens, per block);
    * self-attention: 4·L²·d (QK^T and PV over all heads, non-causal);
    * cross-attention: 4·L·T·d.

    Plus, once: the text embedding 2·T·(text_dim·d + d²), the patch embedding
    2·L·(in_dim·pt·ph·pw)·d and the head 2·L·d·(pt·ph·pw·out_dim). The time MLP, norms,
    modulation and softmax are not counted.
    """
    pt, ph, pw = cfg.patch_size
    f, h, w = latent
    n_tok = (f // pt) * (h // ph) * (w // pw)
    d, ffn, t = cfg.dim, cfg.ffn_dim, text_tokens
    patch = math.prod(cfg.patch_size)
    per_block = (2 * n_tok * (6 * d * d + 2 * d * ffn)  # linear
                 + 2 * t * 2 * d * d  # cross-attention K/V of the text tokens
                 + 4 * n_tok * n_tok * d  # self-attention
                 + 4 * n_tok * t * d)  # cross-attention
    once = (2 * t * (cfg.text_dim * d + d * d)  # text embedding
            + 2 * n_tok * cfg.in_dim * patch * d  # patch embedding
            + 2 * n_tok * d * patch * cfg.out_dim)  # head
    return float(per_block * cfg.num_layers + once)


def _init_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights drawn on the parameters' device, in their dtype.

    The scheme of :func:`wanrt.checkpoints.tiny.randomize_` (which draws on the host): modulation
    tables N(0, 0.1²), biases N(0, 0.02²), 1-D (norm) weights 1 + N(0, 0.1²), others N(0, 1/fan_in).
    """
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
            if "modulation" in name:
                p.normal_(0.0, 0.1, generator=g)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=g)
            elif p.ndim == 1:
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(max(1, p.shape[1:].numel())), generator=g)


def build_model(cfg, device: str, dtype: torch.dtype, seed: int = 0):
    """``WanDiT(cfg)`` built on the meta device, materialised on ``device`` with the DiT dtypes."""
    from wanrt.models.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(cfg)
    for name, p in model.named_parameters():
        if not WanDiT.keep_fp32(name):
            p.data = p.data.to(dtype)  # still meta: no memory
    model.to_empty(device=device)
    _init_(model, seed)
    return model.eval().requires_grad_(False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else vm_hwm_mb()


def plans(device: str, caps, requested: list[str] | None, fused_ok: bool):
    """``(OpsPlan, label)`` list: eager; sdpa and triton x {eager, triton} fused ops; optional
    backends with the Triton fused ops; each only when eligible. Also returns the skipped ones."""
    from wanrt.ops import ATTENTION_BACKENDS, OpsPlan
    from wanrt.ops.backends import ineligibility

    out, skipped = [], []
    names = requested or list(ATTENTION_BACKENDS)
    for name in names:
        if name not in ATTENTION_BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; choose from {list(ATTENTION_BACKENDS)}")
        why = ineligibility(name, caps)
        if why:
            skipped.append(f"{name} ({why})")
            continue
        if name == "eager":
            fused_list = ["eager"]
        elif name in ("sdpa", "triton"):
            fused_list = ["eager", "triton"] if fused_ok else ["eager"]
        else:
            fused_list = ["triton"] if fused_ok else ["eager"]
        out += [(OpsPlan(name, f), f"{name} + {f} fused ops") for f in fused_list]
        if name == "triton" and fused_ok:  # RoPE inside the attention kernel instead of in the QK-norm pass
            out.append((OpsPlan(name, "triton", fuse_rope=True), "triton + triton fused ops, RoPE in attention"))
    if not fused_ok:
        skipped.append("Triton fused ops (need CUDA, or --interpret on the CPU)")
    return out, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny float32 config on the CPU (smoke test)")
    ap.add_argument("--interpret", action="store_true",
                    help="with --quick: also run the Triton paths in the CPU interpreter (slow)")
    ap.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (default: all)")
    ap.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"),
                    help="latent frames, height, width (default 21 60 104 = 480x832x81)")
    ap.add_argument("--backends", default=None, help="comma-separated attention backends (default: all eligible)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per backend (after one warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 dense peak for '%% of peak' (default: H100/H200 989, A100 312, else none)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    a = ap.parse_args()
    settle_device_args(ap, a, "the real model")

    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import DiTConfig
    from wanrt.ops.selfcheck import probe_capabilities
    from wanrt.presets import get_preset

    if a.quick:
        cfg = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=64)
        latent, dtype, name = (3, 8, 8), torch.float32, "tiny (dim 64, 2 heads)"
    else:
        cfg = dit_config_for(get_preset(MODELS[a.model]))
        latent, dtype, name = tuple(a.latent), torch.bfloat16, MODELS[a.model]
    if a.layers is not None:
        if not 0 <= a.layers <= cfg.num_layers:
            ap.error(f"--layers must be in 0..{cfg.num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    dev = a.device
    fused_ok = dev.startswith("cuda") or a.interpret
    caps = probe_capabilities(dev, dtype, cfg.head_dim)
    todo, skipped = plans(dev, caps, a.backends.split(",") if a.backends else None, fused_ok)

    t0 = time.perf_counter()
    model = build_model(cfg, dev, dtype)
    _sync(dev)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *latent, device=dev, generator=g)  # [1, 16, F, H, W]
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, generator=g)  # [1, 512, text_dim]
    t = torch.tensor([500], device=dev)
    flops = dit_flops(cfg, latent, cfg.text_len)
    peak = a.peak_tflops
    if peak is None and dev.startswith("cuda"):
        peak = default_peak(a.device)

    results, ref = [], None
    for plan, label in todo:
        model.set_backend(plan)
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = model(x, t, ctx)  # warm-up: Triton compilation and autotuning
            err = 0.0 if ref is None else ((out - ref).norm() / ref.norm()).item()
            if ref is None and plan.attention == "eager":
                ref = out
            del out
            times = []
            for _ in range(a.repeats):
                _sync(dev)
                t1 = time.perf_counter()
                model(x, t, ctx)
                _sync(dev)
                times.append((time.perf_counter() - t1) * 1e3)
        results.append((label, statistics.median(times), _peak_mib(dev), err if ref is not None else None,
                        plan.attention == "eager"))

    eager_ms = next((ms for _, ms, _, _, is_eager in results if is_eager), None)
    rows = []
    for label, ms, mem, err, _ in results:
        tflops = flops / ms / 1e9
        cells = [label, f"{ms:.1f}", f"{eager_ms / ms:.2f}x" if eager_ms else "–",
                 f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}", f"{100 * tflops / peak:.1f}%" if peak else "–",
                 f"{mem / 1024:.2f}", "–" if err is None else f"{err:.1e}"]
        rows.append("| " + " | ".join(cells) + " |")
    n_tok = math.prod(s // p for s, p in zip(latent, cfg.patch_size, strict=True))
    mem_note = "torch.cuda.max_memory_allocated" if dev.startswith("cuda") else "process peak RSS (VmHWM, cumulative)"
    lines = [
        header("bench_dit", dev),
        "",
        f"{name} DiT, {cfg.num_layers} of its blocks (dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads), "
        f"{n_params / 1e6:,.1f}M parameters, {weight_gib:.3g} GiB of weights "
        f"({str(dtype).replace('torch.', '')} + float32 keep_fp32), random, built on meta and materialised on "
        f"{dev} in {build_s:.1f} s. One forward: latent 1x{cfg.in_dim}x{'x'.join(map(str, latent))} = "
        f"{n_tok} tokens, {cfg.text_len} text tokens, batch 1, no CFG; {flops / 1e12:.4g} TFLOP per forward "
        f"(dit_flops). Median of {a.repeats} forwards after one warm-up; peak memory: {mem_note}; "
        f"% of peak against {f'{peak:.0f} TFLOP/s' if peak else 'none given'}."
        + (" Triton ran in the CPU interpreter." if a.interpret else ""),
        "",
        "| backend | ms per forward | speedup vs eager | TFLOP/s | % of peak | peak memory GiB | rel. err vs eager |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    if skipped:
        lines += ["", "Not benchmarked here: " + "; ".join(skipped) + "."]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
