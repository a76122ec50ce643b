"""The memory planner: which parts live on the GPU, for a budget (pure: sizes in, plan out).

Three modes, cheapest in transfers first:

* ``none``: every part resident (text encoder, image encoder, DiT, VAE) — the peak is their sum plus the largest
  phase's activations;
* ``model``: each part on the GPU only while it runs (text encoding, image conditioning, denoising, decoding are
  separate phases) — the peak is the largest phase;
* ``block``: as ``model`` for the encoders and the VAE; during denoising the DiT's non-block weights (embeddings,
  head) and ``resident`` blocks stay on the GPU, the others stream through ``window`` slots from host memory (a
  block is copied while an earlier one computes) — the peak of the denoising phase is
  ``dit_other + (resident + window) * block + activations + workspace``; ``(blocks - resident) * block`` bytes move
  per step.

When the activations of one DiT forward do not fit, two measures shrink them, tried in this order: micro-batching
(the CFG samples of a batched forward go through each block one after the other: one sample's activations plus the
other's residual stream, the weights still used once), then the FFN in token chunks (per token: it removes the FFN
hidden state, ``ffn_dim`` per token, from the activation term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

OFFLOAD_MODES = ("none", "model", "block")
GIB = 1 << 30


@dataclass(frozen=True)
class PartSizes:
    """Measured sizes in bytes of the parts of an Engine and of one generation's activations.

    Attributes:
        text_encoder, image_encoder, vae: weights of the parts (0 for a part the model does not have).
        dit_other: DiT weights outside the blocks (patch, text, time embeddings, head).
        block: weights of one DiT block (all blocks are the same size); blocks: how many.
        dit_activations: one DiT forward at the request's size (both CFG branches when batched).
        ffn_hidden: the part of ``dit_activations`` that is the FFN hidden state (what chunking the FFN removes).
        text_activations, vae_activations: the text encoder's and the VAE decode's working memory.
        workspace: allowance for kernels' workspaces, the CUDA context and allocator slack.
        cfg_samples: samples in the forward ``dit_activations`` was measured for (2: both CFG branches batched).
        residual: one sample's residual stream (what stays alive of a sample while another one runs a block).
    """

    text_encoder: int
    image_encoder: int
    vae: int
    dit_other: int
    block: int
    blocks: int
    dit_activations: int
    ffn_hidden: int = 0
    text_activations: int = 0
    vae_activations: int = 0
    workspace: int = 512 << 20
    cfg_samples: int = 1
    residual: int = 0

    @property
    def dit(self) -> int:
        """All the DiT's weights."""
        return self.dit_other + self.block * self.blocks


@dataclass(frozen=True)
class MemoryPlan:
    """Where each part lives and what that costs (``engine.memory_plan``).

    Attributes:
        mode: ``"none"``, ``"model"`` or ``"block"``.
        resident: DiT blocks kept on the GPU (all of them unless ``mode == "block"``).
        window: streaming slots for the other blocks (0 unless ``mode == "block"``).
        ffn_chunk: the FFN runs in chunks of this many tokens (None: whole).
        microbatch: the batch's samples (CFG branches) go through each block one at a time.
        peak: expected peak GPU bytes; budget: the budget planned for (None: none given).
        moved_per_step: bytes copied host→GPU per denoising step (DiT forward).
        placement: ``{part: "gpu" | "gpu while running" | "host" | "streamed"}``.
        phases: expected peak bytes of each phase (``text``, ``image``, ``denoise``, ``decode``).
    """

    mode: str
    resident: int
    window: int
    ffn_chunk: int | None
    microbatch: bool
    peak: int
    budget: int | None
    moved_per_step: int
    placement: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the mode, the blocks, the peak and the bytes per step."""
        blocks = f", {self.resident} resident + {self.window} streaming blocks" if self.mode == "block" else ""
        chunk = f", FFN in chunks of {self.ffn_chunk} tokens" if self.ffn_chunk else ""
        chunk += ", CFG samples one at a time per block" if self.microbatch else ""
        return (f"offload {self.mode}{blocks}{chunk}: expected peak {self.peak / GIB:.2f} GiB"
                f"{'' if self.budget is None else f' of {self.budget / GIB:.2f}'}, "
                f"{self.moved_per_step / GIB:.2f} GiB moved per step")


class BudgetTooSmall(ValueError):
    """No plan fits the budget; ``minimum`` is the smallest budget (bytes) that would."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum


def _phases(s: PartSizes, mode: str, resident: int, window: int, chunked: bool, micro: bool) -> dict[str, int]:
    act, ffn = s.dit_activations, s.ffn_hidden
    if micro and s.cfg_samples > 1:
        act = act // s.cfg_samples + (s.cfg_samples - 1) * s.residual
        ffn = ffn // s.cfg_samples
    act -= ffn if chunked else 0
    text = s.text_encoder + s.text_activations
    image = s.image_encoder + s.vae  # CLIP and the VAE encode of the conditioning frames
    decode = s.vae + s.vae_activations
    if mode == "none":
        everything = s.text_encoder + s.image_encoder + s.vae + s.dit
        return {"text": everything + s.text_activations, "image": everything,
                "denoise": everything + act + s.workspace, "decode": everything + s.vae_activations}
    if mode == "model":
        denoise = s.dit + act + s.workspace
    else:
        denoise = s.dit_other + (resident + window) * s.block + act + s.workspace
    return {"text": text, "image": image, "denoise": denoise, "decode": decode}


def _plan(s: PartSizes, mode: str, resident: int, window: int, chunked: bool, budget: int | None,
          ffn_chunk_tokens: int, micro: bool = False) -> MemoryPlan:
    phases = _phases(s, mode, resident, window, chunked, micro)
    moved = (s.blocks - resident) * s.block if mode == "block" else 0
    if mode == "none":
        placement = {"text_encoder": "gpu", "image_encoder": "gpu", "dit": "gpu", "vae": "gpu"}
    elif mode == "model":
        placement = {"text_encoder": "gpu while running", "image_encoder": "gpu while running",
                     "dit": "gpu while running", "vae": "gpu while running"}
    else:
        placement = {"text_encoder": "gpu while running", "image_encoder": "gpu while running",
                     "dit": f"{resident} blocks + embeddings and head on the gpu, {s.blocks - resident} blocks "
                            f"streamed through {window} slots", "vae": "gpu while running"}
    if not s.image_encoder:
        placement.pop("image_encoder")
    return MemoryPlan(mode, s.blocks if mode != "block" else resident, window if mode == "block" else 0,
                      ffn_chunk_tokens if chunked else None, micro and s.cfg_samples > 1, max(phases.values()), budget,
                      moved, placement, phases)


def plan_memory(sizes: PartSizes, budget_bytes: int | None = None, mode: str | None = None, *,
                window: int = 2, ffn_chunk_tokens: int = 4096) -> MemoryPlan:
    """The plan for ``sizes`` within ``budget_bytes``.

    ``mode`` None picks the cheapest mode that fits (``none``, then ``model``, then ``block`` with as many resident
    blocks as fit, chunking the FFN only when even one streamed block would not fit otherwise). A given ``mode`` is
    planned as asked (``block`` still picks the resident count for the budget). Without a budget every block is
    resident (``none``/``model``) or none is (``block``: the least memory).

    Raises:
        ValueError: unknown mode, ``window < 2``, negative sizes.
        BudgetTooSmall: nothing fits; the message names the smallest budget that would (in GiB, rounded up to
            0.01) and what it plans.
    """
    if mode is not None and mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    if window < 2:
        raise ValueError(f"window must be >= 2 (one block computing, one arriving), got {window}")
    if any(v < 0 for v in vars(sizes).values()):
        raise ValueError(f"sizes must be >= 0, got {sizes}")
    streamable = max(0, sizes.blocks - window)  # the most blocks that can be resident while streaming
    measures = [(False, False), (False, True), (True, False), (True, True)]  # (chunked, micro), cheapest first
    candidates: list[MemoryPlan] = []
    for m in ([mode] if mode else list(OFFLOAD_MODES)):
        for chunked, micro in measures:
            if (chunked and not sizes.ffn_hidden) or (micro and sizes.cfg_samples < 2):
                continue
            args = (budget_bytes, ffn_chunk_tokens, micro)
            if m != "block":
                candidates.append(_plan(sizes, m, sizes.blocks, 0, chunked, *args))
                continue
            if sizes.blocks <= window and mode is None:  # chosen for a budget: the window would hold them all
                candidates.append(_plan(sizes, m, sizes.blocks, 0, chunked, *args))
                continue
            least = _plan(sizes, m, 0, window, chunked, *args)
            if budget_bytes is None:
                candidates.append(least)
                continue
            spare = budget_bytes - least.phases["denoise"]  # what the blocks may add to the denoising phase
            resident = min(streamable, spare // sizes.block) if spare >= 0 and sizes.block else 0
            candidates.append(_plan(sizes, m, int(resident), window, chunked, *args))
    if budget_bytes is None:
        return candidates[0]
    for plan in candidates:
        if plan.peak <= budget_bytes:
            return plan
    smallest = min(candidates, key=lambda p: p.peak)
    need = math.ceil(smallest.peak / GIB * 100) / 100
    raise BudgetTooSmall(f"vram_budget_gb={budget_bytes / GIB:.2f} cannot be met: the smallest feasible budget is "
                         f"{need:.2f} GiB ({smallest.describe()}); raise the budget, lower the size or frame count, "
                         "or use an 8-bit precision", smallest.peak)
