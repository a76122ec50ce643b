"""Wan2.1/Wan2.2 diffusion transformer (DiT): text-to-video, image-to-video (with or without CLIP),
first-last-frame, VACE and Wan2.2 TI2V (per-token timesteps).

Reproduces ``WanModel`` of the official code (``wan/modules/model.py``) with the same
parameter names, so ``state_dict()`` keys are exactly the official checkpoint keys
(docs/model-reference.md §2, §3, §9). Image conditioning (i2v, flf2v) and VACE's hint stream
(``VaceWanModel``, ``wan/modules/vace_model.py``) are options of the same module, selected by
``DiTConfig.model_type``.

Dtype rule (docs/CONTRACTS.md): every Linear / Conv casts its input to its own weight dtype.
With all weights float32 the whole model runs in float32. With the big Linear weights in
bf16 and the parameters named by :meth:`WanDiT.keep_fp32` in float32 it reproduces the
official bf16-autocast numerics: fp32 residual stream, fp32 time MLP, modulation and head,
float64 RoPE, bf16 GEMMs and attention.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wanrt.ops import (
    ATTENTION_BACKENDS,
    OpsPlan,
    RopeTable,
    attention,
    gated_residual,
    gated_residual_layer_norm,
    layer_norm,
    modulated_layer_norm,
    qk_norm_rope,
    rms_norm,
    rope_freqs,
    rope_table,
)
from wanrt.ops.backends import plan as make_plan
from wanrt.ops.selfcheck import probe_capabilities

from .dit_config import CLIP_TOKENS, ROPE_MAX_POS, DiTConfig

IMG_LN_EPS = 1e-5  # nn.LayerNorm default eps used by the official MLPProj (§2.5)
_EAGER = OpsPlan()  # the reference path


# --------------------------------------------------------------------------- layers


def _modulation_parameter(n: int, dim: int) -> nn.Parameter:
    """The learned modulation table ``[1, n, dim]``, initialised N(0, 1/dim) (as ``torch.randn(1, n, dim) /
    sqrt(dim)``, the same numbers). Built under ``torch.device("meta")`` (a checkpoint about to be loaded) it is
    left uninitialised: sampling on the meta device costs a cold process over a second of imports."""
    t = torch.empty(1, n, dim)
    if t.device.type != "meta":
        t.normal_().div_(dim**0.5)
    return nn.Parameter(t)


def input_quant_dtype(*linears: nn.Module) -> torch.dtype | None:
    """The 8-bit dtype all ``linears`` quantize their input to (wanrt.quant W8A8 layers), else None (also when one
    has a runtime LoRA branch, which reads the float input: :mod:`wanrt.lora`)."""
    if not all(hasattr(m, "qdtype") for m in linears) or any(hasattr(m, "lora_branch") for m in linears):
        return None
    from wanrt.quant.layers import input_quant_dtype as quant_dtype

    return quant_dtype(*linears)


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a Linear computes and returns in: its weight dtype, or ``out_dtype`` for the quantized
    layers of :mod:`wanrt.quant` (whose weights are 8-bit)."""
    return getattr(linear, "out_dtype", None) or linear.weight.dtype


class Linear(nn.Linear):
    """``nn.Linear`` that casts its input to the weight dtype (the CONTRACTS dtype rule).

    With bf16 weights this is exactly the GEMM the official code runs under bf16 autocast.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in float32 and returned in the input dtype (``WanLayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """``WanRMSNorm``: ``(x.float() * rsqrt(mean(x^2) + eps)).type_as(x) * weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding ``[cos(t * f_i), sin(t * f_i)]``, ``f_i = 10000^(-i / (dim/2))``.

    Reproduces official ``sinusoidal_embedding_1d``: computed in float64, cos half first.

    Args:
        t: ``[B]`` timesteps on the 0..1000 scale (int or float).
        dim: Output width (even).

    Returns:
        float32 ``[B, dim]``.
    """
    half = dim // 2
    pos = t.to(torch.float64)  # [B]
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(pos, inv)  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()  # [B, dim]


class _Projections(nn.Module):
    """q/k/v/o projections (dim -> dim, with bias) and the optional full-dim q/k RMS norms that
    self- and cross-attention share; parameter names are the official ones."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(
        self, x: torch.Tensor, norm: nn.Module, rope: RopeTable | None, dtype: torch.dtype, plan: OpsPlan
    ) -> torch.Tensor:
        """QK-norm (when the model has it) + optional RoPE + cast: ``[B, S, dim]`` → ``[B, S, n, d]``
        in ``dtype``, stored in the layout the attention backend reads best."""
        weight = norm.weight if isinstance(norm, RMSNorm) else None
        return qk_norm_rope(
            x, weight, self.eps, rope, num_heads=self.num_heads, out_dtype=dtype,
            layout=ATTENTION_BACKENDS[plan.attention].layout, backend=plan.fused,
        )


class SelfAttention(_Projections):
    """Official ``WanSelfAttention``: q/k RMS norm over ``dim``, 3-D RoPE, full attention."""

    def forward(self, x: torch.Tensor, rope: RopeTable, plan: OpsPlan = _EAGER, sp=None) -> torch.Tensor:
        """Self-attention.

        Args:
            x: ``[B, S, dim]`` (modulated, normalised hidden states).
            rope: Per-token RoPE rotations of the token grid.
            plan: Backends; with the ``triton`` attention backend the RoPE is applied inside the
                attention kernel, otherwise together with the QK-norm (float64 on the eager path).
            sp: sequence parallel (``wanrt.parallel.dit``): ``x`` is this rank's token shard, ``rope`` its
                rows, and ``sp(q, k, v, plan)`` attends over the whole sequence (RoPE applied before it).

        Returns:
            ``[B, S, dim]`` in the dtype of ``o``'s weight.
        """
        v = self.v(x).unflatten(2, (self.num_heads, self.head_dim))  # [B, S, n, d], compute dtype
        if sp is not None:  # this rank's tokens; the whole sequence is attended across the ranks
            q = self._heads(self.q(x), self.norm_q, rope, v.dtype, plan)  # [B, S_local, n, d]
            k = self._heads(self.k(x), self.norm_k, rope, v.dtype, plan)  # [B, S_local, n, d]
            out = sp(q, k, v, plan)  # [B, S_local, n, d]
        elif plan.attention == "triton" and plan.fuse_rope:  # RoPE fused into the attention kernel
            q = self._heads(self.q(x), self.norm_q, None, v.dtype, plan)  # [B, S, n, d]
            k = self._heads(self.k(x), self.norm_k, None, v.dtype, plan)  # [B, S, n, d]
            out = attention(q, k, v, rope=rope, backend="triton")  # [B, S, n, d]
        else:
            # Official order: norm, RoPE (float64 → float32), cast to the compute dtype.
            q = self._heads(self.q(x), self.norm_q, rope, v.dtype, plan)  # [B, S, n, d]
            k = self._heads(self.k(x), self.norm_k, rope, v.dtype, plan)  # [B, S, n, d]
            out = attention(q, k, v, backend=plan.attention)  # [B, S, n, d]
        return self.o(out.flatten(2))  # [B, S, dim]


class CrossAttention(_Projections):
    """Official ``WanT2VCrossAttention`` / ``WanI2VCrossAttention`` (``with_image=True``).

    Unmasked attention over the zero-padded text tokens; with image conditioning a second
    unmasked attention over the CLIP tokens (own k_img/v_img/norm_k_img, same q) whose
    output is summed with the text output before ``o`` (§2.9).
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool, eps: float, with_image: bool
    ) -> None:
        super().__init__(dim, num_heads, qk_norm, eps)
        if with_image:
            self.k_img = Linear(dim, dim)
            self.v_img = Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None = None,
        plan: OpsPlan = _EAGER,
    ) -> torch.Tensor:
        """Cross-attention of ``x [B, S, dim]`` over ``context [B, text_len, dim]``.

        ``context_img [B, N_img, dim]`` (i2v/flf2v) adds the image attention. Returns
        ``[B, S, dim]`` in the dtype of ``o``'s weight.
        """
        dtype = compute_dtype(self.v)
        n, d = self.num_heads, self.head_dim
        q = self._heads(self.q(x), self.norm_q, None, dtype, plan)  # [B, S, n, d]
        k = self._heads(self.k(context), self.norm_k, None, dtype, plan)  # [B, L, n, d]
        out = attention(q, k, self.v(context).unflatten(2, (n, d)), backend=plan.attention)  # [B, S, n, d]
        if context_img is not None:
            # Sum of the two attention outputs; a single rounding to the compute dtype, as
            # the official fp32 sum of two bf16 outputs followed by the bf16 cast of ``o``.
            k_img = self._heads(self.k_img(context_img), self.norm_k_img, None, dtype, plan)  # [B, N, n, d]
            v_img = self.v_img(context_img).unflatten(2, (n, d))  # [B, N, n, d]
            out = out + attention(q, k_img, v_img, backend=plan.attention)  # [B, S, n, d]
        return self.o(out.flatten(2))  # [B, S, dim]


class Block(nn.Module):
    """Official ``WanAttentionBlock`` (§2.6).

    ``e = modulation + e0`` (fp32) chunks into shift/scale/gate for self-attention and for
    the FFN; cross-attention has no modulation and no gate. Residual adds are float32.

    The block is written as the fused ops of :mod:`wanrt.ops` so that every residual add is fused
    with the norm that follows it. Its input is the residual ``x`` and ``h``, the already
    normalised-and-modulated input of self-attention; it returns the residual before the FFN's
    gated add and that add's operands ``(y, gate)``, which :class:`WanDiT` fuses with the next
    block's ``norm1`` (or the head's norm).
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (
            LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
            if cfg.cross_attn_norm
            else nn.Identity()
        )
        self.cross_attn = CrossAttention(
            dim, cfg.num_heads, cfg.qk_norm, cfg.eps, with_image=cfg.has_clip
        )
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, dim)
        )
        self.modulation = _modulation_parameter(6, dim)
        self.ffn_chunk: int | None = None  # tokens per FFN chunk (WanDiT.set_ffn_chunk)

    def chunks(self, e0: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | TokenMod:
        """``(modulation + e0).chunk(6)``: shift/scale/gate of self-attention, then of the FFN;
        each float32 ``[B, 1, dim]``. With per-token timesteps (``index [B, L]`` into the rows of the
        distinct values' ``e0 [K, 6, dim]``) a :class:`TokenMod` whose items are float32 ``[B, L, dim]``."""
        if index is not None:
            return TokenMod(self.modulation.float() + e0, index)  # [K, 6, dim]
        return (self.modulation.float() + e0).chunk(6, dim=1)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        mod: tuple[torch.Tensor, ...],
        rope: RopeTable,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        plan: OpsPlan = _EAGER,
        sp=None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One block.

        Args:
            x: Residual ``[B, S, dim]`` (the patch-embedding dtype in block 0, float32 after).
            h: ``norm1(x) * (1 + scale_sa) + shift_sa`` in the self-attention GEMM dtype.
            mod: :meth:`chunks` of this block.
            rope: RoPE rotations; context, context_img: embedded text/image tokens.
            plan: Backends. sp: sequence parallel attention (see :meth:`SelfAttention.forward`), or None.

        Returns:
            ``(x, (y, gate))``: the float32 residual after cross-attention and the FFN output
            with its gate; the block's output is ``x + y * gate``.
        """
        fused = plan.fused  # mod is read by index where used: per-token items are gathered then (TokenMod)
        prequant = plan.quant == fused  # the norm quantizes for the 8-bit Linears only with the plan's quant kernel
        y = self.self_attn(h, rope, plan, sp) if sp is not None else self.self_attn(h, rope, plan)  # [B, S, dim]
        if isinstance(self.norm3, LayerNorm):
            x, h = gated_residual_layer_norm(
                x, y, mod[2], self.norm3.eps, weight=self.norm3.weight, bias=self.norm3.bias,
                out_dtype=compute_dtype(self.cross_attn.q),
                quantize=input_quant_dtype(self.cross_attn.q) if prequant else None, backend=fused,
            )  # x fp32 [B, S, dim], h = norm3(x)
        else:
            x = h = gated_residual(x, y, mod[2], backend=fused)  # [B, S, dim] fp32
        y = self.cross_attn(h, context, context_img, plan)  # [B, S, dim]
        x, h = gated_residual_layer_norm(
            x, y, None, self.norm2.eps, shift=mod[3], scale=mod[4],
            out_dtype=compute_dtype(self.ffn[0]), quantize=input_quant_dtype(self.ffn[0]) if prequant else None,
            backend=fused,
        )  # x + cross-attention; h = norm2(x) * (1 + scale_ff) + shift_ff
        return x, (self.feed_forward(h), mod[5])

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN on ``h`` ``[B, S, dim]``, in token chunks of ``ffn_chunk`` when set (per token: the same values,
        without the ``[B, S, ffn_dim]`` hidden state of the whole sequence)."""
        chunk = self.ffn_chunk
        if chunk is None or h.shape[1] <= chunk:
            return self.ffn(h)
        return torch.cat([self.ffn(h[:, s:s + chunk]) for s in range(0, h.shape[1], chunk)], dim=1)


class VaceBlock(Block):
    """Official ``VaceWanAttentionBlock``: a :class:`Block` on the hint stream ``c``.

    The first (``block_id`` 0) adds the main stream's patch-embedded tokens: ``c = before_proj(c) + x``. Each
    returns the stream after the block and its hint ``after_proj(c)``, which :class:`WanDiT` adds (times the
    conditioning scale) to the main stream after block ``vace_layers[block_id]``. Official keys
    ``vace_blocks.N.before_proj`` / ``after_proj`` (diffusers ``proj_in`` / ``proj_out``).
    """

    def __init__(self, cfg: DiTConfig, block_id: int) -> None:
        super().__init__(cfg)
        self.block_id = block_id
        if block_id == 0:
            self.before_proj = Linear(cfg.dim, cfg.dim)
        self.after_proj = Linear(cfg.dim, cfg.dim)


class Head(nn.Module):
    """Official ``Head``: ``head(norm(x) * (1 + scale) + shift)``.

    ``shift, scale = modulation + e`` (chunk 0 = shift, 1 = scale), with ``e`` the time
    embedding before ``time_projection`` (§2.10).
    """

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = Linear(dim, out_features)
        self.modulation = _modulation_parameter(2, dim)

    def chunks(self, e: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, scale)`` = ``(modulation + e).chunk(2)``, each float32 ``[B, 1, dim]``; with per-token
        timesteps (``index [B, L]`` into the rows of the distinct values' ``e [K, dim]``) each ``[B, L, dim]``
        (official Wan2.2 ``modulation.unsqueeze(0) + e.unsqueeze(2)`` per token)."""
        if index is not None:
            mod = TokenMod(self.modulation.float() + e.unsqueeze(1), index)  # [K, 2, dim]
            return mod[0], mod[1]
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return shift, scale

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x float32 ``[B, S, dim]``, e float32 ``[B, dim]`` → ``[B, S, pt*ph*pw*out_dim]``."""
        shift, scale = self.chunks(e)
        return self.head(modulated_layer_norm(x, shift, scale, self.norm.eps, out_dtype=self.head.weight.dtype))


class TokenMod:
    """Per-token modulation, gathered one chunk at a time where an op reads it.

    ``table [K, n, dim]`` float32 holds ``modulation + e0`` (or the head's ``modulation + e``) of the ``K`` distinct
    timesteps; ``index [B, L]`` (int64) names each token's row. ``mod[i]`` is chunk ``i`` of every token,
    ``table[index, i]`` ``[B, L, dim]``: the same numbers as the official per-token ``(modulation.unsqueeze(0) +
    e0).chunk(n, dim=2)``, but only the chunk an op reads is materialised, when it reads it (the official
    ``e0 [B, L, 6, dim]`` and its per-block sum are six chunks each, alive through the whole forward).
    """

    __slots__ = ("index", "table")

    def __init__(self, table: torch.Tensor, index: torch.Tensor) -> None:
        self.table, self.index = table, index

    def __len__(self) -> int:
        return self.table.shape[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return F.embedding(self.index, self.table[:, i])  # [B, L, dim]: the token's row of chunk i


class MLPProj(nn.Module):
    """Official ``MLPProj``: LayerNorm, Linear, GELU (exact), Linear, LayerNorm on CLIP features.

    flf2v adds the learned ``emb_pos`` ``[1, 514, image_dim]`` to the two images' tokens.
    """

    def __init__(self, image_dim: int, dim: int, with_pos: bool) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm(image_dim, eps=IMG_LN_EPS),
            Linear(image_dim, image_dim),
            nn.GELU(),
            Linear(image_dim, dim),
            LayerNorm(dim, eps=IMG_LN_EPS),
        )
        if with_pos:
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * CLIP_TOKENS, image_dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        """``[B, N_img, image_dim]`` → ``[B, N_img, dim]``; computed from float32 features."""
        x = clip_fea.float()  # the official LayerNorms run in fp32 under autocast
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()  # [B, 514, image_dim]
        return self.proj(x)


# --------------------------------------------------------------------------- model

@dataclasses.dataclass
class DiTInputs:
    """What :meth:`WanDiT.prepare` hands to the blocks and the head.

    Attributes:
        x: Patch-embedded tokens ``[B, S, dim]`` (the patch embedding's dtype): the blocks' input.
        e: float32 time embedding ``[B, dim]`` (the head's modulation; TeaCache mode "e"); with per-token
            timesteps (``t_index`` set) the embedding of the ``K`` distinct timesteps ``[K, dim]``.
        e0: float32 time projection ``[B, 6, dim]`` (the blocks' modulation; TeaCache mode "e0"); with
            per-token timesteps ``[K, 6, dim]``.
        context: Embedded text ``[B, text_len, dim]``.
        context_img: Embedded CLIP tokens ``[B, N_img, dim]`` (i2v/flf2v) or None.
        rope: RoPE rotations of the token grid.
        grid: Token grid ``(F', H', W')``.
        sp: sequence parallel attention when ``x`` is one rank's token shard (``wanrt.parallel.dit``), else None.
        vace: VACE only: the patch-embedded hint-stream input ``[B, S, dim]`` (sharded like ``x``), else None.
        vace_scale: VACE only: float32 conditioning scale per VACE block ``[len(vace_layers)]``.
        t_index: per-token timesteps only (a ``[B, L]`` ``t`` whose rows are not constant): int64 ``[B, S]``, each
            token's row of ``e``/``e0`` (sharded like ``x``); None otherwise (``e``/``e0`` per sample).
    """

    x: torch.Tensor
    e: torch.Tensor
    e0: torch.Tensor
    context: torch.Tensor
    context_img: torch.Tensor | None
    rope: RopeTable
    grid: tuple[int, int, int]
    sp: Any = None
    vace: torch.Tensor | None = None
    vace_scale: torch.Tensor | None = None
    t_index: torch.Tensor | None = None


_KEEP_FP32 = re.compile(
    r"(^|\.)modulation$"  # blocks.N.modulation, head.modulation
    r"|^time_embedding\.|^time_projection\.|^head\."
    r"|\.norm_(q|k|k_img)\.weight$|\.norm3\.(weight|bias)$"
    r"|^img_emb\.proj\.[04]\.(weight|bias)$|^img_emb\.emb_pos$"
)


class WanDiT(nn.Module):
    """Wan2.1 DiT; ``state_dict()`` keys are exactly the official checkpoint keys (§3).

    Args:
        config: Architecture; ``config.model_type`` selects t2v / i2v / flf2v.

    Holds no buffers: the RoPE tables are built lazily in ``forward`` and cached per device
    (and the per-token rotations for the last token grid). Constructible under
    ``torch.device('meta')`` and loadable with ``load_state_dict(sd, assign=True)``.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            Linear(cfg.freq_dim, dim), nn.SiLU(), Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(dim, math.prod(cfg.patch_size) * cfg.out_dim, cfg.eps)
        if cfg.has_clip:
            self.img_emb = MLPProj(cfg.image_dim, dim, with_pos=cfg.model_type == "flf2v")
        if cfg.has_vace:
            self.vace_patch_embedding = nn.Conv3d(
                cfg.vace_in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
            )
            self.vace_blocks = nn.ModuleList(VaceBlock(cfg, n) for n in range(len(cfg.vace_layers)))
            self._vace_after = {layer: n for n, layer in enumerate(cfg.vace_layers)}  # main block -> hint
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._rope_last: tuple[Any, RopeTable] | None = None
        self.plan = _EAGER
        self.offload = None  # a wanrt.offload.BlockMover when the blocks stream from host memory
        self.microbatch = False  # run a batch's samples through each block one at a time (memory plans)

    def set_ffn_chunk(self, tokens: int | None) -> None:
        """Run every block's FFN in chunks of ``tokens`` tokens (None: whole), bounding its hidden state to
        ``tokens * ffn_dim``. Raises ValueError for a non-positive count."""
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"ffn chunk must be a positive int or None, got {tokens!r}")
        for block in self.blocks:
            block.ffn_chunk = tokens

    def set_backend(self, backend: str | OpsPlan = "auto", *, fused: str | None = None, quant: str | None = None,
                    vae: str | None = None) -> OpsPlan:
        """Choose the kernels that run this model (call after the weights are on their device).

        The plan is the only record of them: the 8-bit Linears of :mod:`wanrt.quant` get its ``quant``
        backend here (their ``act_backend``), the GGUF Linears its ``fused`` one (their ``dequant_backend``).

        Args:
            backend: ``"auto"``, a name of :data:`wanrt.ops.ATTENTION_BACKENDS` (``eager``,
                ``sdpa``, ``triton``, ``flash-attn``, ``sageattention``, ``xformers``), or an
                :class:`~wanrt.ops.OpsPlan` (taken as it is). ``"eager"`` is the exact reference path.
                The capabilities are those of the device and compute dtype of the attention weights.
            fused: Override the fused-ops backend (``"eager"`` or ``"triton"``); see
                :func:`wanrt.ops.backends.plan`.
            quant: Override the activation-quantization backend (default: as the fused ops).
            vae: The VAE backend the plan records (``"eager"``, ``"triton"``, ``"tensorrt"``; default:
                the current plan's). This model does not run the VAE; ``WanVAE.set_backend`` takes it.

        Returns:
            The resolved :class:`~wanrt.ops.OpsPlan` (also stored as ``self.plan``).

        Raises:
            ValueError: unknown backend name.
            BackendUnavailableError: an explicit backend that cannot run here (the message names
                the missing package's install command and the available backends).
        """
        if not isinstance(backend, OpsPlan):
            ref = self.blocks[0].self_attn.v if len(self.blocks) else self.head.head
            caps = probe_capabilities(ref.weight.device, compute_dtype(ref), self.config.head_dim)
            backend = make_plan(backend, caps, fused, self.plan.vae if vae is None else vae, quant=quant)
        for m in self.modules():
            if hasattr(m, "act_backend"):  # wanrt.quant's 8-bit Linears
                m.act_backend = backend.quant
            if hasattr(m, "dequant_backend"):  # GGUF Linears: dequantized by the fused-ops backend
                m.dequant_backend = backend.fused
        self.plan = backend
        return backend

    @staticmethod
    def keep_fp32(name: str) -> bool:
        """True for parameters that stay float32 when the rest is loaded in bf16/fp16.

        These are the modulation tables, time embedding and projection, the head (norm,
        modulation, Linear), the weighted norms (q/k RMS norms, ``norm3``) and the
        ``img_emb`` layer norms and ``emb_pos`` (§9.1). Everything else (patch embedding,
        text embedding, attention and FFN Linears, img_emb Linears) may be low precision.

        Args:
            name: An official state-dict key, e.g. ``'blocks.3.modulation'``.
        """
        return _KEEP_FP32.search(name) is not None

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        context: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
        clip_fea: torch.Tensor | None = None,
        vace_context: torch.Tensor | None = None,
        vace_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            x: Noisy latents ``[B, C, F, H, W]``; ``C = in_dim`` for t2v, ``in_dim - y.shape[1]``
                for i2v/flf2v. F, H, W must be divisible by ``patch_size``.
            t: Timesteps on the 0..1000 scale, int or float: ``[B]`` (or a scalar, used for every sample), or
                per token ``[B, L]`` with ``L = F'·H'·W'`` the video tokens (unpadded, the patch embedding's
                token order ``f·H'W' + h·W' + w``; Wan2.2 TI2V: 0 on the first latent frame's tokens). Only the
                distinct values of ``t`` are embedded; a ``[B, L]`` ``t`` whose rows are constant is the
                ``[B]`` path exactly (docs/CONTRACTS.md, "Timesteps").
            context: Text features ``[B, L, text_dim]``, ``L <= text_len``; zero-padded here to
                ``text_len`` (pad shorter prompts with zeros yourself when batching: the
                result is the same, cross-attention is unmasked).
            y: i2v/flf2v only: conditioning ``[B, C_y, F, H, W]`` (mask 4 + VAE latent 16),
                concatenated after ``x`` on channels before the patch embedding.
            clip_fea: i2v/flf2v with CLIP only (``config.has_clip``; refused by Wan2.2's CLIP-less i2v): CLIP
                ViT-H/14 penultimate features
                ``[B, 257, image_dim]`` (i2v) or ``[B, 514, image_dim]`` (flf2v: first then
                last frame).
            vace_context: vace only (and required there): the hint-stream input ``[B, vace_in_dim, F, H, W]``
                on the latent grid of ``x`` (inactive latents 16, reactive latents 16, the 8x8 pixel mask 64;
                official ``vace_context``, diffusers ``control_hidden_states``).
            vace_scale: vace only: how strongly the hints steer (official ``context_scale``, diffusers
                ``control_hidden_states_scale``): a float, or a tensor of one scale per VACE block.

        Returns:
            float32 velocity ``[B, out_dim, F, H, W]``.

        Raises:
            ValueError: on missing/unexpected conditioning or any shape mismatch.
        """
        inp = self.prepare(x, t, context, y=y, clip_fea=clip_fea, vace_context=vace_context, vace_scale=vace_scale)
        x, pending = self.run_blocks(inp)
        return self.run_head(inp, x, pending)[0]

    # ---------------------------------------------------------------- the forward in three parts
    # For step caching (TeaCache) and CUDA graphs the denoising loop drives the forward in parts:
    # ``prepare`` (cheap: patch embedding, time and text embeddings), ``run_blocks`` (the transformer
    # blocks, nearly all of the work), ``run_head``. ``forward`` is exactly the three in a row.

    def prepare(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
        clip_fea: torch.Tensor | None = None,
        vace_context: torch.Tensor | None = None,
        vace_scale: float | torch.Tensor = 1.0,
    ) -> DiTInputs:
        """Everything before the blocks: checks, patch embedding, time and text (and image) embeddings,
        RoPE rotations. Arguments and errors as :meth:`forward`."""
        cfg = self.config
        x = self._check_video(x, y)  # [B, in_dim, F, H, W]
        b = x.shape[0]
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

        # Tokens: idx = f*H'W' + h*W' + w.
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, F', H', W']
        x = x.flatten(2).transpose(1, 2)  # [B, S, dim]

        # [B, dim], [B, 6, dim]; per-token t: [K, dim], [K, 6, dim] of the K distinct values, and index [B, L]
        e, e0, t_index = self.time_tables(t, b, x.device, tokens=x.shape[1])
        context = self.text_embedding(self._check_context(context, b))  # [B, text_len, dim]
        context_img = None
        if cfg.has_clip:
            context_img = self.img_emb(self._check_clip(clip_fea, b))  # [B, N_img, dim]
        elif clip_fea is not None:
            what = "this i2v model has none (image_dim=None)" if cfg.has_image_input else \
                f"model_type={cfg.model_type!r}"
            raise ValueError(f"clip_fea is only accepted by i2v/flf2v models with CLIP ({what})")
        vace, scale = self._vace_tokens(vace_context, vace_scale, x, grid)
        return DiTInputs(x, e, e0, context, context_img, self._rope(grid, x.device), grid, vace=vace,
                         vace_scale=scale, t_index=t_index)

    def time_embeddings(
        self, t: torch.Tensor | float, batch: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e, e0)``: the float32 time embedding ``[B, dim]`` and its projection ``[B, 6, dim]``.

        Float64 sinusoid, then the fp32 time MLP (keep_fp32 weights). Cheap: step caches (TeaCache) call it to
        decide whether a step runs the blocks before any other work.

        Per-token timesteps (``t [B, L]`` with a non-constant row) give the step caches' signal of the
        per-token embedding without materialising it: ``e [B*K, dim]`` and ``e0 [B*K, 6, dim]``, row
        ``b*K + k`` the embedding of the ``k``-th distinct value times the number of tokens of sample ``b`` at
        that value. For any two steps with the same distinct-value layout, ``rel_l1`` of these equals ``rel_l1``
        of the official per-token ``e [B, L, dim]`` / ``e0 [B, L, 6, dim]`` (each token counted once).
        """
        device = device if device is not None else self.head.modulation.device
        e, e0, index = self.time_tables(t, batch, device)
        if index is None:
            return e, e0
        k = e.shape[0]
        counts = F.one_hot(index, k).sum(dim=1).to(torch.float32)  # [B, K] tokens per distinct value
        return ((counts[:, :, None] * e).flatten(0, 1),  # [B*K, dim]
                (counts[:, :, None, None] * e0).flatten(0, 1))  # [B*K, 6, dim]

    def time_tables(
        self, t: torch.Tensor | float, batch: int, device: torch.device | None = None, *, tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(e, e0, index)``: the time embedding and projection of ``t`` (float32), as the blocks and head read them.

        ``t`` ``[B]`` (or a scalar), or a ``[B, L]`` whose rows are constant: ``e [B, dim]``, ``e0 [B, 6, dim]``,
        ``index`` None (the ``[B]`` path, bit for bit). Per-token ``t [B, L]`` (``L = tokens`` when given):
        only the ``K`` distinct values of ``t`` are embedded, ``e [K, dim]``, ``e0 [K, 6, dim]``, and ``index``
        int64 ``[B, L]`` names each token's row (Wan2.2 TI2V image-to-video: ``K = 2``, t=0 on the first latent
        frame and t elsewhere). One host sync for a ``[B, L]`` ``t`` (are the rows constant; the distinct values).

        Raises:
            ValueError: ``t`` of another shape or a complex/bool dtype.
        """
        device = device if device is not None else self.head.modulation.device
        t = self._check_timesteps(t, batch, device, tokens)  # [B] or [B, L]
        if t.ndim == 2 and bool((t == t[:, :1]).all()):
            t = t[:, 0]  # constant rows: exactly the [B] path, no per-token tensor
        index = None
        if t.ndim == 2:
            t, index = torch.unique(t, sorted=True, return_inverse=True)  # [K] distinct values, [B, L] rows
        e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim)).float()  # [B or K, dim]
        e0 = self.time_projection(e).float().unflatten(1, (6, self.config.dim))  # [B or K, 6, dim]
        return e, e0, index

    def run_blocks(self, inp: DiTInputs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The transformer blocks on ``inp.x``.

        Returns:
            ``(x, pending)``: the float32 residual ``[B, S, dim]`` before the last block's gated FFN
            add, and that add's ``(y, gate)`` (``None`` for a model without blocks). The blocks'
            output is ``x + y * gate``; :meth:`run_head` computes it fused with the head's norm.
        """
        mover = self.offload  # block offload (wanrt.offload.BlockMover): copies around each block, or None
        b = inp.x.shape[0]
        # micro-batching: the samples of a batch (the two CFG branches) go through each block one after the other,
        # so the block's weights are used (and, offloaded, moved) once while one sample's activations are alive
        groups = [slice(s, s + 1) for s in range(b)] if self.microbatch and b > 1 else [slice(None)]
        xs = [inp.x[g] for g in groups]
        pendings: list = [None] * len(groups)  # (y, gate) of the previous block's FFN, fused with the next norm
        # VACE: each hint is computed just before the main block that takes it (the hint stream is a chain of its
        # own, read by no main block), so one hint and the stream are alive at a time, not all len(vace_layers)
        hints = [self.vace_hints(inp, g) for g in groups] if inp.vace is not None else None
        for i, block in enumerate(self.blocks):
            if mover is not None:
                mover.before(i)
            for j, g in enumerate(groups):
                xs[j], pendings[j] = self._block(block, xs[j], pendings[j], inp, g)
                if hints is not None and i in self._vace_after:  # official: x = block(x) + hint * context_scale
                    n = self._vace_after[i]
                    x = gated_residual(xs[j], *pendings[j], backend=self.plan.fused)
                    xs[j], pendings[j] = x + next(hints[j]).float() * inp.vace_scale[n], None
            if mover is not None:
                mover.after(i)
        if len(groups) == 1:
            return xs[0], pendings[0]
        pending = None if pendings[0] is None else tuple(torch.cat(p, dim=0) for p in zip(*pendings, strict=True))
        return torch.cat(xs, dim=0), pending

    def vace_hints(self, inp: DiTInputs, g: slice = slice(None)):
        """The VACE blocks on the hint stream of the samples ``g`` (official ``forward_vace``), lazily: yields one
        hint ``[b, S, dim]`` (unscaled) per VACE block, in ``vace_layers`` order, computing each when asked."""
        plan, eps = self.plan, self.config.eps
        c = inp.vace[g]
        for block in self.vace_blocks:
            if block.block_id == 0:
                c = block.before_proj(c) + inp.x[g].to(compute_dtype(block.before_proj))
            mod = self._chunks(block, inp, g)
            sa = block.self_attn
            quant = input_quant_dtype(sa.q, sa.k, sa.v) if plan.quant == plan.fused else None
            h = modulated_layer_norm(c, mod[0], mod[1], eps, out_dtype=compute_dtype(sa.q), quantize=quant,
                                     backend=plan.fused)
            context_img = inp.context_img[g] if inp.context_img is not None else None
            c, (y, gate) = block(c, h, mod, inp.rope, inp.context[g], context_img, plan, inp.sp)
            c = gated_residual(c, y, gate, backend=plan.fused)  # [b, S, dim] fp32
            yield block.after_proj(c)

    def _vace_tokens(self, vace_context: torch.Tensor | None, vace_scale, x: torch.Tensor,
                     grid: tuple[int, int, int]):
        """The patch-embedded hint-stream input ``[B, S, dim]`` and the float32 scales ``[len(vace_layers)]``
        (None, None for a model without VACE). Raises ValueError on a missing or misshapen input."""
        cfg = self.config
        if not cfg.has_vace:
            if vace_context is not None:
                raise ValueError(f"vace_context is only accepted by VACE models (model_type={cfg.model_type!r})")
            return None, None
        if vace_context is None:
            raise ValueError("a VACE model needs vace_context [B, vace_in_dim, F, H, W] (for plain text-to-video "
                             "give the official empty input: zero latents of a gray video and an all-ones mask)")
        b = x.shape[0]
        pt, ph, pw = cfg.patch_size
        expected = (b, cfg.vace_in_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw)
        if vace_context.ndim != 5 or tuple(vace_context.shape) != expected:
            raise ValueError(f"vace_context must be {list(expected)} (the latent grid of x), got "
                             f"{list(vace_context.shape)}")
        if vace_context.device != x.device:
            raise ValueError(f"vace_context is on {vace_context.device}, the model on {x.device}")
        c = self.vace_patch_embedding(vace_context.to(self.vace_patch_embedding.weight.dtype))
        c = c.flatten(2).transpose(1, 2)  # [B, S, dim], the token order of x
        n = len(cfg.vace_layers)
        if not isinstance(vace_scale, torch.Tensor) and not math.isfinite(vace_scale):
            raise ValueError(f"vace_scale must be finite, got {vace_scale}")
        scale = torch.as_tensor(vace_scale, dtype=torch.float32, device=x.device)
        if scale.ndim == 0:
            scale = scale.expand(n)
        if scale.shape != (n,):
            raise ValueError(f"vace_scale must be a float or {n} scales (one per VACE block), got shape "
                             f"{list(scale.shape)}")
        return c, scale

    @staticmethod
    def _chunks(block: Block, inp: DiTInputs, g: slice):
        """``block``'s modulation of the samples ``g`` (per-token timesteps: the distinct values' table, shared)."""
        if inp.t_index is None:
            return block.chunks(inp.e0[g])
        return block.chunks(inp.e0, inp.t_index[g])

    def _block(self, block: Block, x: torch.Tensor, pending, inp: DiTInputs, g: slice):
        """One block on the samples ``g`` of the batch: its norm1 fused with the previous block's gated FFN add."""
        plan, eps = self.plan, self.config.eps
        mod = self._chunks(block, inp, g)  # 6 x [b, 1, dim] fp32 (per-token t: [b, S, dim] each, when read)
        sa = block.self_attn
        out_dtype = compute_dtype(sa.q)
        quant = input_quant_dtype(sa.q, sa.k, sa.v)  # 8-bit q/k/v: quantize norm1's output once for all
        quant = quant if plan.quant == plan.fused else None  # ... with the plan's quant kernel (Block.forward)
        if pending is None:  # block 0: norm1 of the patch embedding (rounded to its dtype)
            h = modulated_layer_norm(x, mod[0], mod[1], eps, out_dtype=out_dtype, quantize=quant,
                                     backend=plan.fused)
        else:
            x, h = gated_residual_layer_norm(
                x, *pending, eps, shift=mod[0], scale=mod[1], out_dtype=out_dtype, quantize=quant,
                backend=plan.fused,
            )  # previous block's output x + y*gate_ffn, and this block's norm1 + modulation
        context_img = inp.context_img[g] if inp.context_img is not None else None
        return block(x, h, mod, inp.rope, inp.context[g], context_img, plan, inp.sp)

    def run_head(
        self,
        inp: DiTInputs,
        x: torch.Tensor,
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on the blocks' output ``x + y * gate`` (or ``x`` when ``pending`` is None).

        Returns:
            ``(velocity, blocks_out)``: float32 ``[B, out_dim, F, H, W]`` and the blocks' output
            ``[B, S, dim]`` (float32 when a block ran), for step caches that store
            ``blocks_out - inp.x``.
        """
        out, x = self.head_tokens(inp, x, pending)  # [B, S, pt*ph*pw*out_dim]
        return self._unpatchify(out, inp.grid).float(), x

    def head_tokens(
        self,
        inp: DiTInputs,
        x: torch.Tensor,
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`run_head` before the unpatchify: ``(tokens [B, S, pt*ph*pw*out_dim], blocks_out [B, S, dim])``
        (per token, so a rank can run it on its own token shard)."""
        plan, eps = self.plan, self.config.eps
        shift, scale = self.head.chunks(inp.e, inp.t_index)  # 2 x [B, 1, dim] (per-token t: [B, S, dim])
        head_dtype = self.head.head.weight.dtype
        if pending is None:
            h = modulated_layer_norm(x, shift, scale, eps, out_dtype=head_dtype, backend=plan.fused)
        else:
            x, h = gated_residual_layer_norm(
                x, *pending, eps, shift=shift, scale=scale, out_dtype=head_dtype, backend=plan.fused
            )
        return self.head.head(h), x  # [B, S, pt*ph*pw*out_dim], [B, S, dim]

    # ---------------------------------------------------------------- helpers

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, S, pt*ph*pw*C]`` → ``[B, C, F'*pt, H'*ph, W'*pw]``.

        Head channel index ``((p*ph + q)*pw + r)*C + c`` holds output pixel
        ``(c, f*pt + p, h*ph + q, w*pw + r)`` (official ``unpatchify``, §2.11).
        """
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)  # [B, F', H', W', pt, ph, pw, C]
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)  # [B, C, F, H, W]

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> RopeTable:
        key = (device, grid)
        if self._rope_last is not None and self._rope_last[0] == key:
            return self._rope_last[1]
        tables = self._rope_tables.get(device)
        if tables is None:
            # Built on the CPU like the official code, then moved.
            tables = tuple(
                f.to(device) for f in rope_freqs(self.config.head_dim, ROPE_MAX_POS)
            )
            self._rope_tables[device] = tables
        rope = rope_table(grid, tables)  # [S, head_dim/2]
        self._rope_last = (key, rope)
        return rope

    def _check_video(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        if cfg.has_image_input:
            if y is None:
                raise ValueError(f"model_type={cfg.model_type!r} needs the conditioning y")
            if y.ndim != 5 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"y must be [B, C_y, F, H, W] matching x {tuple(x.shape)}, "
                    f"got {tuple(y.shape)}"
                )
            if x.shape[1] + y.shape[1] != cfg.in_dim:
                raise ValueError(
                    f"x channels ({x.shape[1]}) + y channels ({y.shape[1]}) must equal "
                    f"in_dim={cfg.in_dim}"
                )
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # [B, in_dim, F, H, W]
        else:
            if y is not None:
                raise ValueError(f"y is only accepted by i2v/flf2v models (model_type={cfg.model_type!r})")
            if x.shape[1] != cfg.in_dim:
                raise ValueError(
                    f"x must have in_dim={cfg.in_dim} channels, got {x.shape[1]} "
                    f"(shape {tuple(x.shape)})"
                )
        for name, size, p in zip("FHW", x.shape[2:], cfg.patch_size, strict=True):
            if size % p or size == 0:
                raise ValueError(
                    f"x {name}={size} must be a positive multiple of the patch size {p} "
                    f"(patch_size={cfg.patch_size})"
                )
            if size // p > ROPE_MAX_POS:
                raise ValueError(f"x {name}={size} gives more than {ROPE_MAX_POS} tokens")
        return x

    @staticmethod
    def _check_timesteps(
        t: torch.Tensor | int | float, batch: int, device: torch.device, tokens: int | None = None
    ) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)  # [B]
        per_token = t.ndim == 2 and t.shape[0] == batch and t.shape[1] >= 1 and tokens in (None, t.shape[1])
        if tuple(t.shape) != (batch,) and not per_token:
            length = "L" if tokens is None else f"L={tokens} video tokens"
            raise ValueError(f"t must be a scalar, [B={batch}] or per token [B={batch}, {length}], got shape "
                             f"{tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must be int or float, got {t.dtype}")
        return t

    def _check_context(self, context: torch.Tensor, batch: int) -> torch.Tensor:
        cfg = self.config
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be [B={batch}, L, text_dim={cfg.text_dim}], "
                f"got shape {tuple(context.shape)}"
            )
        length = context.shape[1]
        if length > cfg.text_len:
            raise ValueError(
                f"context has {length} tokens, more than text_len={cfg.text_len}; "
                "trim the text-encoder output"
            )
        if length < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - length))  # [B, text_len, text_dim]
        return context

    def _check_clip(self, clip_fea: torch.Tensor | None, batch: int) -> torch.Tensor:
        cfg = self.config
        if clip_fea is None:
            raise ValueError(f"model_type={cfg.model_type!r} needs clip_fea")
        expected = (batch, cfg.image_tokens, cfg.image_dim)
        if tuple(clip_fea.shape) != expected:
            raise ValueError(
                f"clip_fea must be {list(expected)} for model_type={cfg.model_type!r}, "
                f"got {list(clip_fea.shape)}"
            )
        return clip_fea
