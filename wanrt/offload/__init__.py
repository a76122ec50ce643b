"""Big models on small GPUs: the memory planner (pure), block offload with prefetch, and the placement of an
Engine's parts (``Engine(..., offload=..., vram_budget_gb=...)``)."""

from .planner import OFFLOAD_MODES, BudgetTooSmall, MemoryPlan, PartSizes, plan_memory

__all__ = ["OFFLOAD_MODES", "BudgetTooSmall", "MemoryPlan", "PartSizes", "plan_memory"]
