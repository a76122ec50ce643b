"""``wanrt.distributed``: set up the process group of a multi-GPU run launched by torchrun.

    # torchrun --nproc-per-node 4 my_script.py
    import wanrt
    wanrt.distributed.init()
    engine = wanrt.Engine("t2v-14b", ckpt, parallel=wanrt.ParallelConfig(ulysses=4))

``init`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), picks NCCL with
``cuda:LOCAL_RANK`` when CUDA is available (gloo on the CPU) and gives every collective a timeout, so that a rank
that fails or hangs makes the others fail with :class:`~wanrt.parallel.step.RankFailure` instead of waiting forever.
"""

from __future__ import annotations

import torch.distributed as dist

from .parallel.comm import init
from .parallel.step import RankFailure


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Destroy the default process group (if any); call at the end of a torchrun script."""
    if is_initialized():
        dist.destroy_process_group()


__all__ = ["RankFailure", "init", "is_initialized", "shutdown"]
