"""Helpers shared by wanrt's Triton kernels: availability, interpreter detection, launch checks."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is decorated, so it must be set before the first
    ``wanrt.kernels`` module is imported; tests' ``conftest.py`` does that on machines without CUDA.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_device_ok(t: torch.Tensor) -> bool:
    """A Triton kernel can take ``t``: a CUDA tensor, or any CPU tensor under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every tensor is usable by a Triton kernel and they share a device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}")
    for t in tensors:
        if t is not None and not kernel_device_ok(t):
            raise ValueError(
                f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                f"got a tensor on {t.device}"
            )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


TORCH_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def row_kernel_warps(tile: int) -> int:
    """Warps for a memory-bound kernel whose program holds ``tile`` elements per tensor.

    About 8 elements per thread and tensor (two 16-byte loads of fp32, one of bf16), between 4 and 32 warps.
    Compiled for sm_90a, this keeps the fused norm kernels at 32-60 registers at the Wan2.1 widths (dim 1536
    and 5120), where 4 elements more per thread cost up to 223 registers and most of the occupancy
    (``benchmarks/kernel_resources.py``).
    """
    return min(32, max(4, tile // 256))
