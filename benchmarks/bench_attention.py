"""Attention kernels at the real Wan2.1 self-attention shapes: every eligible backend against SDPA.

Measures ``wanrt.ops.attention(q, k, v, backend=...)`` (non-causal, no mask, B = 1) at

* 1.3B, 480x832x81: 12 heads x 128, L = 32,760 tokens (grid 21x30x52),
* 14B,  480x832x81: 40 heads x 128, L = 32,760,
* 14B, 720x1280x81: 40 heads x 128, L = 75,600 (grid 21x45x80),

in bf16 on CUDA. Rows per shape:

* ``sdpa`` (the reference row): torch SDPA on q, k already rotated by the 3-D RoPE; the rotation
  is applied once beforehand and **not timed** (in the DiT it is fused into the QK-norm kernel,
  ``benchmarks/bench_norms.py`` times that). Also ``sdpa[flash]`` / ``sdpa[cudnn]`` (CUDA): the
  same call pinned to one of torch's SDPA kernels, to show which one the plain ``sdpa`` row picked
  and what the best built-in kernel does.
* ``triton``: wanrt's Triton FlashAttention on the same pre-rotated q, k (RoPE untimed).
* ``triton + fused RoPE``: the same kernel given the unrotated q, k and the RoPE table; the rotation
  is done inside the kernel and **timed**.
* ``sdpa + RoPE``: SDPA after rotating q and k with ``wanrt.ops.rope_rotate`` (the Triton
  kernel on CUDA, the eager float64 one on the CPU), rotation **timed**: the fair partner of the
  fused row.
* ``flash-attn``, ``sageattention``, ``xformers`` when installed and eligible
  (``probe_capabilities`` + ``ineligibility``), RoPE pre-applied and untimed; ``eager`` only when
  asked (``--backends``), it is the float32 reference path and takes seconds at these sizes.

Attention FLOPs = 4·B·H·L²·D (QK^T and PV, non-causal; softmax and RoPE not counted). TFLOP/s and
% of the bf16 dense peak (``--peak-tflops``; by default 989 for H100/H200, 312 for A100) come from
the median time of ``triton.testing.do_bench`` (which flushes L2 between runs), after a warm-up
call that also runs the Triton autotuner. The error column is ``‖out − out_sdpa‖ / ‖out_sdpa‖``
on the same inputs (computed once, outside the timing).

``--quick`` runs tiny fp32 shapes (B 1, S 256, H 2, D 64) on the CPU with eager and sdpa, timed by
``time.perf_counter`` medians; ``--interpret`` adds the Triton kernel through Triton's CPU
interpreter (slow: keep the shapes tiny).

    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --quick --interpret
    python benchmarks/bench_attention.py --device cuda --out benchmarks/results/attention_H100.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import torch
from common import default_peak, emit, header, settle_device_args, time_ms

SDPA_KERNELS = ("flash", "cudnn")


@dataclass(frozen=True)
class Shape:
    label: str
    heads: int
    head_dim: int
    grid: tuple[int, int, int]  # (F, H, W) token grid; L = F*H*W
    batch: int = 1

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    def __str__(self) -> str:
        return f"{self.label}: B{self.batch} H{self.heads} D{self.head_dim} L{self.tokens}"


REAL_SHAPES = (
    Shape("1.3B 480P", 12, 128, (21, 30, 52)),
    Shape("14B 480P", 40, 128, (21, 30, 52)),
    Shape("14B 720P", 40, 128, (21, 45, 80)),
)
QUICK_SHAPES = (Shape("tiny", 2, 64, (4, 8, 8)),)


def attention_flops(s: Shape) -> float:
    """4·B·H·L²·D: two GEMMs (QK^T, PV) of 2·L²·D FLOPs per head, non-causal."""
    return 4.0 * s.batch * s.heads * s.tokens**2 * s.head_dim




def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.float(), ref.float()
    return ((o - r).norm() / r.norm()).item()


def _sdpa_kernel(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def bench_shape(s: Shape, a, dtype: torch.dtype, backends: list[str], peak: float | None) -> list[str]:
    """Rows of one shape: ``| shape | backend | RoPE | ms | TFLOP/s | % of peak | speedup | rel. err |``."""
    from wanrt.ops import (
        attention,
        rope_freqs,
        rope_rotate,
        rope_rotate_eager,
        rope_table,
    )

    dev = a.device
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device=dev, dtype=dtype, generator=g)
               for _ in range(3))  # [B, L, H, D]
    rope = rope_table(s.grid, rope_freqs(s.head_dim)).to(dev)
    qr = rope_rotate_eager(q, rope).to(dtype)  # float64 rotation, as the official code; untimed
    kr = rope_rotate_eager(k, rope).to(dtype)
    fused_rope_backend = "triton" if dev.startswith("cuda") or "triton" in backends else "eager"

    def sdpa_with_rope():
        qq = rope_rotate(q, rope, out_dtype=dtype, backend=fused_rope_backend)
        kk = rope_rotate(k, rope, out_dtype=dtype, backend=fused_rope_backend)
        return attention(qq, kk, v, backend="sdpa")

    cases = [("sdpa", "pre-applied (untimed)", lambda: attention(qr, kr, v, backend="sdpa"), None)]
    if dev.startswith("cuda") and not a.no_sdpa_kernels:
        cases += [(f"sdpa[{n}]", "pre-applied (untimed)", lambda: attention(qr, kr, v, backend="sdpa"), n)
                  for n in SDPA_KERNELS]
    for b in backends:
        if b == "sdpa":
            continue
        cases.append((b, "pre-applied (untimed)", lambda b=b: attention(qr, kr, v, backend=b), None))
        if b == "triton":
            cases.append(("triton", "fused in kernel (timed)", lambda: attention(q, k, v, rope=rope, backend="triton"),
                          None))
    cases.append(("sdpa", f"{fused_rope_backend} rope_rotate (timed)", sdpa_with_rope, None))

    flops = attention_flops(s)
    ref_ms, ref_out, rows = None, None, []
    for name, rope_note, fn, kernel in cases:
        ctx = _sdpa_kernel(kernel) if kernel else contextlib.nullcontext()
        try:
            with ctx, torch.no_grad():
                out = fn()
                err = 0.0 if ref_out is None else rel_err(out, ref_out)
                if ref_out is None:
                    ref_out = out
                else:
                    del out
                ms = time_ms(fn, dev, rep_ms=a.rep_ms, cpu_reps=a.repeats)
        except RuntimeError as e:  # e.g. an SDPA kernel that does not take these inputs
            rows.append(f"| {s} | {name} | {rope_note} | failed: {str(e).splitlines()[0][:80]} | | | | |")
            continue
        ref_ms = ref_ms or ms
        tflops = flops / ms / 1e9
        tf = f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}"
        pct = f"{100 * tflops / peak:.1f}%" if peak else "–"
        rows.append(f"| {s} | {name} | {rope_note} | {ms:.3f} | {tf} | {pct} | {ref_ms / ms:.2f}x | "
                    f"{err:.1e} |")
    return rows  # the inputs are freed on return (the caller empties the CUDA cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny fp32 shapes on the CPU (smoke test)")
    ap.add_argument("--interpret", action="store_true",
                    help="with --quick: also run the Triton kernel in the CPU interpreter (slow)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated attention backends (default: every eligible one; eager only on the CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 dense peak for '%% of peak' (default: H100/H200 989, A100 312, else none)")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per row (CUDA)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row on the CPU")
    ap.add_argument("--no-sdpa-kernels", action="store_true", help="skip the sdpa[flash|cudnn] rows")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    a = ap.parse_args()
    settle_device_args(ap, a, "the real shapes")

    from wanrt.ops import ATTENTION_BACKENDS
    from wanrt.ops.backends import ineligibility
    from wanrt.ops.selfcheck import probe_capabilities

    dtype = torch.float32 if a.quick else torch.bfloat16
    shapes = QUICK_SHAPES if a.quick else REAL_SHAPES
    caps = probe_capabilities(a.device, dtype, shapes[0].head_dim)
    requested = a.backends.split(",") if a.backends else [
        n for n in ATTENTION_BACKENDS if n != "eager" or not a.device.startswith("cuda")]
    backends, skipped = [], []
    for n in requested:
        if n not in ATTENTION_BACKENDS:
            ap.error(f"unknown backend {n!r}; choose from {list(ATTENTION_BACKENDS)}")
        why = ineligibility(n, caps)
        if why:
            skipped.append(f"{n} ({why})")
        else:
            backends.append(n)
    peak = a.peak_tflops if a.peak_tflops is not None else default_peak(a.device)

    rows = []
    for s in shapes:
        rows += bench_shape(s, a, dtype, backends, peak)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()

    timing = ("triton.testing.do_bench median (L2 flushed), after a warm-up call" if a.device.startswith("cuda")
              else f"time.perf_counter median of {a.repeats} after a warm-up call")
    lines = [
        header("bench_attention", a.device),
        "",
        f"Self-attention, non-causal, no mask, {str(dtype).replace('torch.', '')}, q/k/v [B, L, H, D] contiguous; "
        f"FLOPs = 4·B·H·L²·D; {timing}. Peak: "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'none given'}. Speedup and error are against the first "
        "(plain sdpa) row of each shape. RoPE 'pre-applied (untimed)': q, k rotated once beforehand "
        "(float64, official numerics); '(timed)': the rotation is inside the measured time."
        + (" Triton ran in the CPU interpreter." if a.interpret else ""),
        "",
        "| shape | backend | RoPE | ms | TFLOP/s | % of peak | speedup vs sdpa | rel. err vs sdpa |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if skipped:
        lines += ["", "Not benchmarked here: " + "; ".join(skipped) + "."]
    if a.device.startswith("cuda"):
        lines += ["", (f"SDPA kernels enabled: flash {torch.backends.cuda.flash_sdp_enabled()}, "
                       f"cudnn {torch.backends.cuda.cudnn_sdp_enabled()}, "
                       f"efficient {torch.backends.cuda.mem_efficient_sdp_enabled()}.")]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
