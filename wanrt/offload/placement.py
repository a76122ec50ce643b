"""Where an Engine's parts live: measure them, plan for the budget (:mod:`wanrt.offload.planner`), place them.

The Engine loads every part into host memory first when it offloads (or plans for a budget), so that the plan is
made from the measured sizes before anything reaches the GPU. :func:`place` then moves what the plan keeps on the
GPU, installs the :class:`~wanrt.offload.mover.BlockMover` for block offload, and resolves the kernels for the
device (the weights' device no longer says where they compute).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .planner import MemoryPlan, PartSizes, plan_memory

log = logging.getLogger("wanrt")
GIB = 1 << 30
TEXT_ACTIVATIONS = 256 << 20  # UMT5 over 512 tokens, batch 2, with slack


def nbytes(module: nn.Module | None) -> int:
    """Bytes of ``module``'s parameters and buffers (0 for None)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def part_sizes(engine, req, *, batched_cfg: bool) -> PartSizes:
    """The measured :class:`PartSizes` of ``engine``'s parts for request ``req``, on one rank: under a parallel
    layout the activations are this rank's token shard, one CFG branch under CFG parallel."""
    from ..request import _dit_forward_bytes, memory_terms

    dit = engine.transformer
    blocks = list(dit.blocks)
    sizes = [nbytes(b) for b in blocks]
    block = max(sizes, default=0)  # the largest block (GGUF files may mix types across blocks)
    dtype_bytes = engine.config.dit_dtype.itemsize
    mesh = getattr(engine, "mesh", None)  # a parallel layout: this rank's share of the activations
    sp = mesh.sp if mesh is not None else 1
    if mesh is not None and mesh.config.cfg > 1:
        batched_cfg = False  # each rank runs one CFG branch
    terms = memory_terms(req, engine.preset, dtype_bytes=dtype_bytes, cfg_batch=batched_cfg,
                         tiled_vae=engine.config.vae_tiling, sequence_parallel=sp)
    samples = 2 if batched_cfg and req.do_cfg else 1
    ffn = _dit_forward_bytes(req, engine.preset, dtype_bytes, sp, ffn=False) * samples
    tokens = -(-req.tokens // sp)
    residual = tokens * engine.preset.arch.dim * (4 + 2 * dtype_bytes)  # x (fp32), y and gate of one sample
    text = engine.text_encoder.model if engine.text_encoder is not None else None
    if engine.config.text_device.type == "cpu" and engine.device.type != "cpu":
        text = None  # the text encoder runs on the host: it never takes GPU memory
    image = engine.image_encoder.model if engine.image_encoder is not None else None
    return PartSizes(text_encoder=nbytes(text), image_encoder=nbytes(image), vae=nbytes(engine.vae),
                     dit_other=nbytes(dit) - sum(sizes), block=block, blocks=len(blocks),
                     dit_activations=terms["dit"] + terms["latents"], ffn_hidden=ffn, text_activations=TEXT_ACTIVATIONS,
                     vae_activations=terms["vae"] + terms["frames"], cfg_samples=samples, residual=residual)


def plan_for(engine, req) -> MemoryPlan:
    """The plan of ``engine.config`` (offload mode, budget, window) for request ``req``."""
    c = engine.config
    budget = None if c.vram_budget_gb is None else int(c.vram_budget_gb * GIB)
    mode = None if c.offload == "auto" else c.offload
    batched = c.offload == "block" or (req.do_cfg and c.use_cfg_batch)
    return plan_memory(part_sizes(engine, req, batched_cfg=batched), budget, mode, window=c.offload_window)


def _move_except_blocks(model: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of the DiT outside its blocks onto ``device``."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for name, p in list(model.named_parameters(recurse=False)):
        p.data = p.data.to(device)
    model._rope_tables = {}
    model._rope_last = None


def place(engine, plan: MemoryPlan) -> None:
    """Put ``engine``'s parts where ``plan`` says (see the module docstring)."""
    from ..config import resolve_kernels

    dev, dit = engine.device, engine.transformer
    reader = None
    if engine.config.offload_to_disk:  # the blocks were loaded as placeholders: read from the file when placed
        from .disk import DiskBlocks

        reader = DiskBlocks(engine.checkpoint_dir)
    streamed = len(dit.blocks) - plan.resident if plan.mode == "block" else 0
    if reader is not None and streamed == 0:  # nothing streams: every block is read once, where it will live
        from .mover import read_blocks

        read_blocks(dit.blocks, range(len(dit.blocks)), reader, dev if plan.mode != "model" else torch.device("cpu"))
        reader.close()
        reader = None
    if plan.mode == "none":
        dit.to(dev)
        engine.vae.to(dev)
        c = engine.config  # the encoders were loaded on the host for planning: back unless offloaded by request
        if engine.text is not None and not c.offload_text_encoder:
            engine.text.offload = False
            engine.text.encoder.model.to(c.text_device)
        if engine.image is not None and not c.offload_image_encoder:
            engine.image.offload = False
            engine.image.image_encoder.model.to(dev)
    elif plan.mode == "block":
        from .mover import BlockMover

        _move_except_blocks(dit, dev)
        dit.offload = BlockMover(dit.blocks, dev, plan.resident, plan.window, reader=reader) if streamed > 0 else None
        if streamed == 0:
            dit.blocks.to(dev)
    dit.set_ffn_chunk(plan.ffn_chunk)
    dit.microbatch = plan.microbatch
    kernels = resolve_kernels(engine.config, dit.config.head_dim)
    dit.set_backend(kernels)
    engine.vae.set_backend(kernels)
    log.info("memory plan: %s", plan.describe())


def visiting(engine, part: str):
    """A context in which ``part`` (``"dit"`` or ``"vae"``) is on the device: a move there and back under the
    ``model`` plan (and the VAE under ``block``), nothing otherwise."""
    from ..conditioning import visiting as visit

    plan = engine.memory_plan
    if plan is None or plan.mode == "none" or (part == "dit" and plan.mode == "block"):
        return contextlib.nullcontext()
    module = engine.transformer if part == "dit" else engine.vae
    return visit(module, engine.device, True)


def check_budget(engine, req) -> None:
    """Refuse ``req`` when, with the placement made at load (mode, resident blocks, FFN chunking), its peak exceeds
    the budget. Raises RequestTooLarge (a ValueError) with both numbers."""
    from ..request import RequestTooLarge
    from .planner import _plan

    placed = engine.memory_plan
    c = engine.config
    batched = placed.mode == "block" or (req.do_cfg and c.use_cfg_batch)
    sizes = part_sizes(engine, req, batched_cfg=batched)
    plan = _plan(sizes, placed.mode, placed.resident, placed.window, placed.ffn_chunk is not None, placed.budget,
                 placed.ffn_chunk or 0, placed.microbatch)
    if plan.peak > placed.budget:
        raise RequestTooLarge(f"this request ({req.width}x{req.height}, {req.num_frames} frames) needs about "
                              f"{plan.peak / GIB:.2f} GiB with the placement made for the budget ({placed.describe()}), "
                              f"over vram_budget_gb={placed.budget / GIB:.2f}; lower the size or frame count, or "
                              "create the Engine with a larger budget", plan.peak, placed.budget)
