"""Process-group setup and the Ulysses all-to-all (torch.distributed).

``init`` reads torchrun's environment; ``seq_to_heads`` / ``heads_to_seq`` move q/k/v between the
sequence-sharded layout ``[B, S_local, H, D]`` and the head-sharded one ``[B, S, H/P, D]`` with one
``all_to_all_single`` each (supported by NCCL and, on CPU tensors, by gloo). Inference only: no autograd.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init(timeout_s: float = 120.0, backend: str | None = None) -> tuple[int, int, torch.device]:
    """Set up the default process group from torchrun's environment; return ``(rank, world_size, device)``.

    The backend is ``nccl`` with ``cuda:LOCAL_RANK`` when CUDA is available, else ``gloo`` on the CPU (or
    ``backend`` when given). Every collective of the group times out after ``timeout_s`` seconds. When the
    default group already exists it is reused as it is. Raises ``RuntimeError`` naming torchrun when one of
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is missing, and ``ValueError`` when
    ``timeout_s`` is not positive.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"multi-process run needs the environment torchrun sets; missing {', '.join(missing)}. "
                           "Launch with: torchrun --nproc-per-node N your_script.py")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def pad_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> tuple[torch.Tensor, int]:
    """``x`` zero-padded at the end of ``dim`` to a multiple of ``multiple``, and the original length of ``dim``.

    Returns ``x`` itself when no padding is needed. Raises ``ValueError`` when ``multiple`` is not positive.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple!r}")
    dim = dim % x.dim()
    length = x.shape[dim]
    extra = (-length) % multiple
    if extra == 0:
        return x, length
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad), length


def _all_to_all(chunks: torch.Tensor, group) -> torch.Tensor:
    """``chunks`` ``[P, ...]`` contiguous: chunk j goes to rank j of ``group``; returns chunk i from rank i."""
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[B, S_local, H, D]`` (this rank's tokens, all heads) → ``[B, S_local*P, H/P, D]`` (all tokens in rank
    order, this rank's heads: ``h`` in ``[r*H/P, (r+1)*H/P)`` for rank ``r`` of ``group``).

    Raises ``ValueError`` when ``H`` does not divide by the group size ``P``.
    """
    world = dist.get_world_size(group)
    b, s_local, h, d = x.shape
    if h % world:
        raise ValueError(f"{h} heads do not divide by the group size {world}")
    if world == 1:
        return x
    chunks = x.reshape(b, s_local, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    out = _all_to_all(chunks, group)  # [P(source rank = token block), B, S_local, H/P, D]
    return out.permute(1, 0, 2, 3, 4).reshape(b, world * s_local, h // world, d)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """The inverse of ``seq_to_heads``: ``[B, S, H/P, D]`` → ``[B, S/P, H, D]`` (this rank's token block).

    Raises ``ValueError`` when ``S`` does not divide by the group size ``P``.
    """
    world = dist.get_world_size(group)
    b, s, hp, d = x.shape
    if s % world:
        raise ValueError(f"sequence length {s} does not divide by the group size {world}")
    if world == 1:
        return x
    chunks = x.reshape(b, world, s // world, hp, d).permute(1, 0, 2, 3, 4).contiguous()
    out = _all_to_all(chunks, group)  # [P(source rank = head block), B, S/P, H/P, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * hp, d)
