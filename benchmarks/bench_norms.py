"""Fused memory-bound ops of the DiT block: wanrt's Triton kernels against their eager twins.

One table per op of :mod:`wanrt.ops` (``qk_norm_rope``, ``modulated_layer_norm``,
``gated_residual_layer_norm``, ``gated_residual``) at the real widths, batch 1:
dim 1536 (1.3B, 12 heads) and 5120 (14B, 40 heads) by L = 32,760 (480x832x81, grid 21x30x52) and
75,600 (720x1280x81, grid 21x45x80) tokens. The dtypes are those of the DiT forward: the residual
``x`` float32, branch outputs ``y`` bf16, ``shift``/``scale``/``gate`` float32 ``[B, 1, dim]``,
results for the next GEMM in bf16; ``qk_norm_rope`` takes the bf16 projection ``[B, L, dim]``,
the float32 RMS weight and the float32 RoPE cos/sin tables.

GB/s is the number of bytes the fused kernel must move (each input read once, each output written
once; see :func:`op_bytes`) divided by the Triton time, and is compared with the device's copy
bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB of float32, bytes read + written).
Times are ``triton.testing.do_bench`` medians (L2 flushed between runs) after a warm-up call on
CUDA, ``time.perf_counter`` medians on the CPU. The error column is ``‖triton − eager‖ / ‖eager‖``,
the largest over the op's outputs, computed once.

``--quick``: small shapes on the CPU, eager only (``--interpret`` adds the Triton kernels through
Triton's CPU interpreter, on the smallest shape only, one timed run: the interpreter is slow).

    python benchmarks/bench_norms.py --quick
    python benchmarks/bench_norms.py --device cuda --out benchmarks/results/norms_H100.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import emit, header, settle_device_args, time_ms

HEAD_DIM = 128
BF16, F32 = torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Shape:
    dim: int
    grid: tuple[int, int, int]  # (F, H, W) token grid; L = F*H*W
    head_dim: int = HEAD_DIM
    batch: int = 1

    @property
    def tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def __str__(self) -> str:
        return f"dim {self.dim}, L {self.tokens}"


REAL_SHAPES = tuple(Shape(d, g) for d in (1536, 5120) for g in ((21, 30, 52), (21, 45, 80)))
QUICK_SHAPES = (Shape(256, (4, 8, 8), head_dim=64), Shape(512, (4, 16, 16), head_dim=64))



def copy_bandwidth_gbs(device: str, a) -> float:
    """GB/s of ``dst.copy_(src)`` over 1 GiB of float32 (64 MiB in --quick), bytes read + written."""
    n = (16 if a.quick else 256) * 2**20  # float32 elements
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=a.rep_ms, cpu_reps=a.repeats)
    return 2 * 4 * n / ms / 1e6


def op_bytes(op: str, s: Shape) -> int:
    """Bytes the fused kernel must read + write once (unique traffic; caches assumed to absorb re-reads).

    Per token (L = tokens, d = dim, D = head_dim; ``[B, 1, d]`` vectors are read once, 4·d bytes each):

    * ``qk_norm_rope``: read x bf16 (2d) + cos, sin fp32 (2 · 4 · D/2 = 4D); write out bf16 (2d);
      plus the fp32 RMS weight (4d once).
    * ``modulated_layer_norm``: read x fp32 (4d); write h bf16 (2d); plus shift, scale (2 · 4d).
    * ``gated_residual_layer_norm``: read x fp32 (4d) + y bf16 (2d); write x_new fp32 (4d) + h bf16
      (2d); plus two or three of gate, shift, scale, weight, bias (counted as 3 · 4d).
    * ``gated_residual``: read x fp32 (4d) + y bf16 (2d); write x_new fp32 (4d); plus gate (4d).
    """
    n, d, hd = s.batch * s.tokens, s.dim, s.head_dim
    per_token, vectors = {
        "qk_norm_rope": (2 * d + 4 * hd + 2 * d, 1),
        "modulated_layer_norm": (4 * d + 2 * d, 2),
        "gated_residual_layer_norm": (4 * d + 2 * d + 4 * d + 2 * d, 3),
        "gated_residual": (4 * d + 2 * d + 4 * d, 1),
    }[op]
    return n * per_token + vectors * 4 * d


@dataclass
class Case:
    op: str
    variant: str
    shape: Shape
    call: Callable[[str], object]  # backend -> output(s)


def make_cases(s: Shape, device: str) -> list[Case]:
    """The op calls of one shape, as the DiT block makes them (inputs drawn once, on ``device``)."""
    from wanrt.ops import (
        gated_residual,
        gated_residual_layer_norm,
        modulated_layer_norm,
        qk_norm_rope,
        rope_freqs,
        rope_table,
    )

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=F32, std=1.0):
        return torch.randn(*shape, device=device, dtype=F32, generator=g).mul_(std).to(dtype)

    b, n, d = s.batch, s.tokens, s.dim
    eps = 1e-6
    x = randn(b, n, d)  # float32 residual stream
    y = randn(b, n, d, dtype=BF16)  # branch output (bf16 GEMM)
    proj = randn(b, n, d, dtype=BF16)  # q or k projection
    shift, scale, gate = (randn(b, 1, d, std=0.1) for _ in range(3))
    rms_w = 1 + randn(d, std=0.1)
    ln_w, ln_b = 1 + randn(d, std=0.1), randn(d, std=0.02)
    rope = rope_table(s.grid, rope_freqs(s.head_dim)).to(device)
    heads = d // s.head_dim
    cases = [
        Case("qk_norm_rope", f"{layout}, {heads} heads", s,
             lambda be, layout=layout: qk_norm_rope(proj, rms_w, eps, rope, num_heads=heads, out_dtype=BF16,
                                                    layout=layout, backend=be))
        for layout in ("bshd", "bhsd")
    ]
    cases.append(Case("modulated_layer_norm", "shift + scale", s,
                      lambda be: modulated_layer_norm(x, shift, scale, eps, out_dtype=BF16, backend=be)))
    cases += [
        Case("gated_residual_layer_norm", "gate, shift + scale (FFN add → next norm1)", s,
             lambda be: gated_residual_layer_norm(x, y, gate, eps, shift=shift, scale=scale, out_dtype=BF16,
                                                  backend=be)),
        Case("gated_residual_layer_norm", "gate, affine (self-attn add → norm3)", s,
             lambda be: gated_residual_layer_norm(x, y, gate, eps, weight=ln_w, bias=ln_b, out_dtype=BF16,
                                                  backend=be)),
        Case("gated_residual_layer_norm", "no gate, shift + scale (cross-attn add → norm2)", s,
             lambda be: gated_residual_layer_norm(x, y, None, eps, shift=shift, scale=scale, out_dtype=BF16,
                                                  backend=be)),
    ]
    cases.append(Case("gated_residual", "gate", s, lambda be: gated_residual(x, y, gate, backend=be)))
    return cases


def _outputs(out) -> list[torch.Tensor]:
    return [t.float() for t in (out if isinstance(out, tuple) else (out,))]


def _rel_err(got, ref) -> float:
    """Largest ``‖got − ref‖ / ‖ref‖`` over the op's outputs (x_new and h for the fused residual + norm)."""
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(_outputs(got), ref, strict=True))


def run_case(c: Case, a, copy_gbs: float, fused: bool) -> str:
    dev = a.device
    with torch.no_grad():
        ref = _outputs(c.call("eager"))
        t_eager = time_ms(lambda: c.call("eager"), dev, rep_ms=a.rep_ms, cpu_reps=a.repeats)
        cells = ["–"] * 5
        if fused:
            err = _rel_err(c.call("triton"), ref)
            # The interpreter is slow (numpy per program instance): one timed run there.
            t_fused = time_ms(lambda: c.call("triton"), dev, rep_ms=a.rep_ms, cpu_reps=1 if a.interpret else a.repeats)
            gbs = op_bytes(c.op, c.shape) / t_fused / 1e6
            pct = 100 * gbs / copy_gbs
            cells = [f"{t_fused:.3f}", f"{t_eager / t_fused:.2f}x", f"{gbs:.0f}" if gbs >= 10 else f"{gbs:.2g}",
                     f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%", f"{err:.1e}"]
    return f"| {c.shape} | {c.variant} | {t_eager:.3f} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes on the CPU, eager only (smoke test)")
    ap.add_argument("--interpret", action="store_true",
                    help="with --quick: also run the Triton kernels in the CPU interpreter")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per row (CUDA)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row on the CPU")
    ap.add_argument("--out", default=None, help="write the markdown tables here too")
    a = ap.parse_args()
    settle_device_args(ap, a, "the real shapes")
    fused = a.device.startswith("cuda") or a.interpret

    copy_gbs = copy_bandwidth_gbs(a.device, a)
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s")
    rows: dict[str, list[str]] = {}
    shapes = (QUICK_SHAPES[:1] if a.interpret else QUICK_SHAPES) if a.quick else REAL_SHAPES
    for s in shapes:
        for c in make_cases(s, a.device):
            rows.setdefault(c.op, []).append(run_case(c, a, copy_gbs, fused))
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()

    timing = ("triton.testing.do_bench medians (L2 flushed) after a warm-up call" if a.device.startswith("cuda")
              else f"time.perf_counter medians of {a.repeats} after a warm-up call")
    lines = [
        header("bench_norms", a.device),
        "",
        f"Batch 1, x float32, y / projections / outputs bf16, modulation float32 [1, 1, dim]; {timing}. "
        f"Copy bandwidth in this run: {copy_gbs:.0f} GB/s (copy_ of "
        f"{'64 MiB' if a.quick else '1 GiB'} float32, read + write). GB/s = bytes the fused kernel must "
        "read + write once (op_bytes) / Triton time."
        + ("" if fused else " Triton not run (CPU without --interpret): eager only.")
        + (" Triton ran in the CPU interpreter." if a.interpret else ""),
    ]
    for op, op_rows in rows.items():
        lines += [
            "",
            f"### {op}",
            "",
            "| shape | variant | eager ms | triton ms | speedup | GB/s | % of copy bandwidth | rel. err |",
            "|---|---|---|---|---|---|---|---|",
            *op_rows,
        ]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
