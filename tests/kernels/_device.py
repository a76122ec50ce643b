"""Where the kernel edge-case tests put their tensors, and the checks that differ between the two ways they run.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the Triton kernels run in the interpreter on
CPU tensors. On a CUDA machine with the interpreter off (``benchmarks/gpu_suite.sh`` runs this folder with
``TRITON_INTERPRET=0``) they run compiled, and a compiled kernel takes CUDA tensors only: the tests build their inputs
on :data:`DEVICE`. Random inputs are drawn by a CPU ``torch.Generator`` and then moved, so both hosts test the same
values (a CUDA generator draws other numbers for the same seed).

Imported by the test modules of this folder as ``_device`` (pytest puts the folder, which has no ``__init__.py``, on
``sys.path``).
"""

from __future__ import annotations

import torch

from wanrt.kernels._common import interpreting
from wanrt.testing import TOLERANCES, Tolerance, assert_close

# The kernels run compiled on a GPU (not in the interpreter): CUDA tensors, and compiled numerics.
COMPILED = torch.cuda.is_available() and not interpreting()
DEVICE = "cuda" if COMPILED else "cpu"

# Share of the elements that may round the other way on the GPU in :func:`assert_close_rounded` (as few as one
# element in several hundred is expected; a missing rounding step moves nearly all of them).
RARE_FLIPS = 0.02


def _share_outside(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> float:
    """Share of the elements with ``|out - ref| > atol + rtol * |ref|`` (compared in float64 on the CPU)."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    return ((o - r).abs() > tol.atol + tol.rtol * r.abs()).double().mean().item() if o.numel() else 0.0


def assert_close_rounded(out: torch.Tensor, ref: torch.Tensor, tight: torch.dtype | Tolerance, rounded: torch.dtype,
                         name: str) -> None:
    """``out`` within the ``tight`` tolerance of ``ref`` although both went through a rounding to ``rounded``.

    In the Triton interpreter every operation runs on its own, as in torch, so the kernel and its eager twin round to
    ``rounded`` at the same points from the same float32 values: the ``tight`` bound holds at every element (a dtype
    means its :data:`wanrt.testing.TOLERANCES` entry; a :class:`Tolerance` is used as given).

    Compiled for a GPU, Triton contracts multiply-adds into FMAs and sums the statistics in another order than torch's
    CUDA kernels, so a float32 intermediate may differ in its last bits and, for the few values next to a rounding
    boundary, round to the neighbouring ``rounded`` value. There the whole tensor is held to ``rounded``'s tolerance,
    and at most :data:`RARE_FLIPS` of the elements may fall outside the ``tight`` bound: a rounding step missing or
    added moves nearly every element by up to half an ulp of ``rounded``, far outside a float32 bound.
    """
    tol = tight if isinstance(tight, Tolerance) else TOLERANCES[tight]
    if not COMPILED:
        assert_close(out, ref, name=name, tol=tol)
        return
    assert_close(out, ref, rounded, name=f"{name} ({rounded} tolerance, compiled)")
    share = _share_outside(out, ref, tol)
    assert share <= RARE_FLIPS, (f"{name}: {share:.1%} of the elements outside the tight bound (atol={tol.atol:g}, "
                                 f"rtol={tol.rtol:g}), more than the {RARE_FLIPS:.0%} that compiled roundings explain")
