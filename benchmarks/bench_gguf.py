"""GGUF dequantization: the eager twin (``wanrt.quant.gguf.dequantize``) against the Triton kernel
(``wanrt.kernels.gguf.gguf_dequantize``), per quantization type, at the Wan2.1 Linear shapes, to bf16.

Columns: milliseconds of each (median), the speed-up, and the kernel's GB/s: bytes it must move (the blocks read,
the bf16 weight written) over its time, against the device's copy bandwidth measured beside it (``dst.copy_(src)``
of 1 GiB, read + write). The bytes of the type against bf16 say what block offload moves per Linear. One
dequantization per Linear and forward is the cost GGUF adds to a GEMM of ``tokens × in × out``: the last column
puts it against a bf16 GEMM at 32,760 tokens (480P, 81 frames) of that shape.

    python benchmarks/bench_gguf.py --device cuda
    python benchmarks/bench_gguf.py --quick [--interpret]     # CPU: a small shape, eager (+ the interpreter)
"""

from __future__ import annotations

import argparse

import torch
from common import emit, header, settle_device_args, time_ms

REAL_SHAPES = [(1536, 1536), (8960, 1536), (5120, 5120), (13824, 5120), (5120, 13824)]  # [out, in]: 1.3B, 14B
QUICK_SHAPES = [(256, 512)]
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0"]
TOKENS = 32760


def _copy_gbps(device: str, quick: bool) -> float:
    n = (64 if quick else 1024) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (time_ms(lambda: dst.copy_(src), device) / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small shape on the CPU, eager only (smoke test)")
    ap.add_argument("--interpret", action="store_true", help="with --quick: the kernel in the CPU interpreter too")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    settle_device_args(ap, a)
    from wanrt.quant.gguf import BLOCKS, dequantize
    from wanrt.testing import random_gguf_blocks

    dev = a.device
    kernel = dev.startswith("cuda") or a.interpret
    if kernel:
        from wanrt.kernels.gguf import gguf_dequantize
    peak = _copy_gbps(dev, a.quick)
    rows = []
    for out_f, in_f in (QUICK_SHAPES if a.quick else REAL_SHAPES):
        gemm_ms = None
        if dev.startswith("cuda"):
            xs = torch.randn(TOKENS, in_f, device=dev, dtype=torch.bfloat16)
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16)
            gemm_ms = time_ms(lambda: xs @ w.t(), dev)
            del xs, w
        for qtype in TYPES:
            per, nbytes = BLOCKS[qtype]
            raw = torch.from_numpy(random_gguf_blocks(qtype, out_f, in_f)).to(dev)
            t_eager = time_ms(lambda: dequantize(raw, qtype, (out_f, in_f), torch.bfloat16), dev)
            moved = raw.numel() + out_f * in_f * 2
            cells = [f"{out_f}x{in_f}", qtype, f"{raw.numel() / (out_f * in_f * 2):.3f}", f"{t_eager:.3f}"]
            if kernel:
                t_k = time_ms(lambda: gguf_dequantize(raw, qtype, torch.bfloat16), dev,
                              cpu_reps=1 if a.interpret else 5)
                ok = torch.equal(gguf_dequantize(raw, qtype, torch.bfloat16).view(out_f, in_f),
                                 dequantize(raw, qtype, (out_f, in_f), torch.bfloat16))
                gbps = moved / (t_k / 1e3) / 1e9
                cells += [f"{t_k:.3f}", f"{t_eager / t_k:.1f}x", f"{gbps:.0f} ({100 * gbps / peak:.0f}%)",
                          "yes" if ok else "no (FMA)"]
            else:
                cells += ["-", "-", "-", "-"]
            cells.append(f"{100 * t_k / gemm_ms:.1f}%" if kernel and gemm_ms else "-")
            rows.append("| " + " | ".join(cells) + " |")
    note = " Triton ran in the CPU interpreter." if a.interpret else \
        ("" if kernel else " Triton not run (CPU without --interpret): eager only.")
    lines = [header("bench_gguf", dev), "",
             f"Dequantization to bf16; copy bandwidth here {peak:.0f} GB/s (read + write).{note}", "",
             "| weight [out x in] | type | bytes vs bf16 | eager ms | Triton ms | speed-up | Triton GB/s (% of copy) | "
             "equal to eager | dequant / GEMM at 32,760 tokens |",
             "|---|---|---|---|---|---|---|---|---|", *rows]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
