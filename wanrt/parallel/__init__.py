"""Multi-rank foundations for sequence parallelism on torch.distributed (NCCL on CUDA, gloo on CPU).

``config``: ``ParallelConfig`` (the layout of ranks, pure); ``comm``: ``init`` from torchrun's environment,
the Ulysses all-to-all and padding; ``ring``: attention with its log-sum-exp, the merge, Ring, Ulysses and
Ulysses x Ring attention.
"""

from .comm import heads_to_seq, init, pad_to_multiple, seq_to_heads
from .config import ParallelConfig, valid_layouts
from .ring import attention_with_lse, merge, ring_attention, ulysses_attention, usp_attention

__all__ = [
    "ParallelConfig", "valid_layouts", "init", "pad_to_multiple", "seq_to_heads", "heads_to_seq",
    "attention_with_lse", "merge", "ring_attention", "ulysses_attention", "usp_attention",
]
