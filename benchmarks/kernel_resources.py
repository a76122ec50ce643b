"""Registers, spills and shared memory of wanrt's Triton kernels, compiled for a GPU without one.

Triton compiles ahead of time for any target (here sm_90a, the H100) on a machine with no GPU: this
script builds every autotuning config of the attention kernel and the launch configs of the fused
memory-bound kernels at the real Wan2.1 widths, then reads the cubin's resource usage with the
``cuobjdump`` that ships with Triton. ``stack`` is the per-thread stack frame in bytes: beyond a few
dozen bytes it means register spills to local memory, which cost throughput on the GPU. Nothing is
run, so this says nothing about speed; it catches spills, shared-memory overflows (H100: 227 KiB per
block) and compile failures before a GPU session.

    python benchmarks/kernel_resources.py [--arch 90] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import warnings

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreted ones
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from common import emit, header  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from wanrt.kernels import attention, modnorm, modnorm_quant, qk_norm_rope  # noqa: E402
from wanrt.kernels._common import row_launch  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
PTR = {"bf16": "*bf16", "fp32": "*fp32", "i32": "*i32"}


def compile_usage(fn, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                  arch: int) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes) of ``fn`` compiled for ``sm_{arch}``.

    Arguments named in ``pointers`` get that pointer type, ``constexprs`` their values, floats named
    ``eps``/``qk_scale`` fp32, and every other argument i32.
    """
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ("eps", "qk_scale", "qmax", "inv_qmax"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2)), int(kernel.metadata.shared)


def attention_rows(arch: int, quick: bool = False) -> list[str]:
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "KLens": "*i32", "Cos": "*fp32",
            "Sin": "*fp32", "LSE": "*fp32"}
    rows = []
    # the plain kernel, with fused RoPE, and with the log-sum-exp output of Ring attention
    for rope, lse in ((False, False), (True, False), (False, True)):
        label = "attention bf16 D128" + (" +RoPE" if rope else "") + (" +LSE" if lse else "")
        for bm, bn, w, st in attention._CONFIGS_16BIT[:1] if quick else attention._CONFIGS_16BIT:
            const = dict(D=128, BLOCK_D=128, HAS_KLENS=False, HAS_ROPE=rope, IEEE=False, INTERP_BF16=False,
                         HAS_LSE=lse, BLOCK_M=bm, BLOCK_N=bn)
            try:
                regs, stack, shared = compile_usage(attention._attn_fwd, ptrs, const, w, st, arch)
                rows.append(f"| {label} | BLOCK_M {bm}, BLOCK_N {bn}, {w} warps, {st} stages | {regs} | {stack} | "
                            f"{shared // 1024} |")
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                rows.append(f"| {label} | BLOCK_M {bm}, BLOCK_N {bn}, {w} warps, {st} stages | "
                            f"failed: {type(e).__name__} | | |")
    return rows


def fused_rows(arch: int, quick: bool = False) -> list[str]:
    rows = []
    for dim in (5120,) if quick else (1536, 5120):
        block, n_rows, warps = row_launch(dim)  # the launchers' recipe: qk_norm_rope and modnorm
        for rope in (False, True):
            const = dict(HEAD_DIM=128, BLOCK=block, ROWS=n_rows, HAS_W=True, ROUND_W=False, HAS_ROPE=rope,
                         RNE_BF16=False)
            ptrs = {"x_ptr": "*bf16", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "o_ptr": "*bf16"}
            regs, stack, shared = compile_usage(qk_norm_rope._norm_rope_kernel, ptrs, const, warps, 1, arch)
            rows.append(f"| qk_norm{'_rope' if rope else ''} bf16, dim {dim} | {n_rows} row, {warps} warps | "
                        f"{regs} | {stack} | {shared // 1024} |")
        const = dict(BLOCK=block, ROWS=n_rows, HAS_Y=True, HAS_GATE=True, WRITE_X=True, DO_NORM=True, HAS_W=False,
                     HAS_B=False, ROUND_X=False, HAS_SHIFT=True, HAS_SCALE=True, RNE_BF16=False)
        ptrs = {"x_ptr": "*fp32", "y_ptr": "*bf16", "gate_ptr": "*fp32", "shift_ptr": "*fp32", "scale_ptr": "*fp32",
                "w_ptr": "*fp32", "bias_ptr": "*fp32", "xnew_ptr": "*fp32", "h_ptr": "*bf16"}
        regs, stack, shared = compile_usage(modnorm._modnorm_kernel, ptrs, const, warps, 1, arch)
        rows.append(f"| gated_residual_layer_norm fp32+bf16 → fp32, bf16, dim {dim} | {n_rows} row, {warps} warps | "
                    f"{regs} | {stack} | {shared // 1024} |")
        warps = row_launch(dim, max_rows=1).num_warps  # modnorm_quant: one row per program
        for qname, qptr in (("fp8", "*fp8e4nv"), ("int8", "*i8")):
            const = dict(BLOCK=block, HAS_Y=True, HAS_GATE=True, WRITE_X=True, HAS_W=False, HAS_B=False,
                         ROUND_X=False, HAS_SHIFT=True, HAS_SCALE=True, OUT_DTYPE=tl.bfloat16,
                         IS_INT8=qname == "int8", SCALE_RECIP=True, INTERPRET=False)
            ptrs = {"x_ptr": "*fp32", "y_ptr": "*bf16", "gate_ptr": "*fp32", "shift_ptr": "*fp32",
                    "scale_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32", "xnew_ptr": "*fp32",
                    "q_ptr": qptr, "qs_ptr": "*fp32", "qmax": "fp32", "inv_qmax": "fp32"}
            regs, stack, shared = compile_usage(modnorm_quant._residual_norm_quant_kernel, ptrs, const, warps, 1,
                                                arch)
            rows.append(f"| gated_residual_layer_norm → {qname} per token, dim {dim} | 1 row, {warps} warps | "
                        f"{regs} | {stack} | {shared // 1024} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90 = H100)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--quick", action="store_true", help="one attention config with and without RoPE, dim 5120 only")
    a = ap.parse_args()
    lines = [
        header("kernel_resources", "cpu"),
        "",
        f"Compiled ahead of time for sm_{a.arch}a by Triton {triton.__version__} on this machine (no GPU; nothing "
        "ran). regs: registers per thread; stack: per-thread stack frame in bytes (spills beyond a few dozen); "
        "shared: KiB of shared memory per block.",
        "",
        "| kernel | config | regs | stack B | shared KiB |",
        "|---|---|---|---|---|",
        *attention_rows(a.arch, a.quick),
        *fused_rows(a.arch, a.quick),
    ]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
