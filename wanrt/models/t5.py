"""UMT5-XXL text encoder of Wan2.1 (encoder only), its tokenizer wrapper and prompt cleaning.

Reproduces ``wan/modules/t5.py::umt5_xxl(encoder_only=True)`` and ``T5EncoderModel.__call__`` of the
official Wan2.1 code (docs/model-reference.md §5.1). Parameter names are the official checkpoint keys of
``models_t5_umt5-xxl-enc-bf16.pth``; ``wanrt/checkpoints/keymap_t5.py`` maps transformers'
``UMT5EncoderModel`` keys onto them.

Math (per layer, pre-norm, no biases anywhere)::

    x = x + o(attn(norm1(x)))                      attn: softmax(q kᵀ + bias)·v, NO 1/sqrt(d) scale
    x = x + fc2(fc1(norm2(x)) * gelu_tanh(gate.0(norm2(x))))
    out = norm(x)

    norm(x)  = weight * cast_w(x.float() * rsqrt(mean(x.float()², -1) + eps))    (T5 RMSNorm)
    bias     = relpos_embedding[bucket(k_pos − q_pos)]  (per layer), finfo.min at padded keys

The model runs in the dtype of its weights (bf16 officially, fp32 in the parity tests); softmax and
the norms' statistics are fp32, as in the official code.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "UMT5Config",
    "UMT5Encoder",
    "TextEncoder",
    "clean_prompt",
    "gelu_tanh",
    "relative_position_bucket",
]


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``, its N(0, 1) initialisation skipped when built under ``torch.device("meta")`` (a
    checkpoint about to be loaded): sampling on the meta device costs a cold process two seconds of imports."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Shape of a UMT5 encoder; the defaults are UMT5-XXL as used by Wan2.1 (docs/model-reference.md §5.1).

    Attributes:
        vocab_size: Rows of ``token_embedding`` (256384 for umt5-xxl: 256300 tokens, padded).
        dim: Model width (d_model).
        dim_attn: Width of q/k/v (num_heads * head_dim); 4096 for XXL, so head_dim = 64.
        dim_ffn: Hidden width of the gated FFN (d_ff).
        num_heads: Attention heads.
        num_layers: Encoder blocks.
        num_buckets: Relative-position buckets (both signs together).
        max_distance: Distance from which all relative positions share the last log bucket.
        shared_pos: One relative-bias table for all layers (T5) instead of one per layer (UMT5).
            Wan2.1 uses False.
        eps: RMSNorm epsilon.

    Raises:
        ValueError: in ``__post_init__`` for non-positive sizes, ``dim_attn`` not divisible by
            ``num_heads``, or an odd ``num_buckets`` below 4.
    """

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    shared_pos: bool = False
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"UMT5Config.{name} must be a positive int, got {value!r}")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even and >= 4 (bidirectional), got {self.num_buckets}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    @property
    def head_dim(self) -> int:
        """Per-head width, ``dim_attn // num_heads`` (64 for XXL)."""
        return self.dim_attn // self.num_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> UMT5Config:
        """Build from a transformers ``UMT5Config`` (object or its ``config.json`` dict).

        Args:
            config: Mapping with ``vocab_size, d_model, d_kv, d_ff, num_heads, num_layers,
                relative_attention_num_buckets, relative_attention_max_distance, layer_norm_epsilon``
                and optionally ``feed_forward_proj``; or an object with ``to_dict()``.

        Raises:
            KeyError: a required field is missing.
            ValueError: ``feed_forward_proj`` is not ``"gated-gelu"`` (the only FFN Wan2.1 uses).
        """
        if not isinstance(config, Mapping):
            config = config.to_dict()
        ffn = config.get("feed_forward_proj", "gated-gelu")
        if ffn != "gated-gelu":
            raise ValueError(f"only feed_forward_proj='gated-gelu' is supported, got {ffn!r}")
        return cls(
            vocab_size=int(config["vocab_size"]),
            dim=int(config["d_model"]),
            dim_attn=int(config["d_kv"]) * int(config["num_heads"]),
            dim_ffn=int(config["d_ff"]),
            num_heads=int(config["num_heads"]),
            num_layers=int(config["num_layers"]),
            num_buckets=int(config["relative_attention_num_buckets"]),
            max_distance=int(config["relative_attention_max_distance"]),
            shared_pos=False,
            eps=float(config["layer_norm_epsilon"]),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers ``UMT5Config`` kwargs (a ``config.json`` dict) of the same encoder.

        Raises:
            ValueError: if ``shared_pos`` is True (UMT5 has a table per layer; T5 would be needed).
        """
        if self.shared_pos:
            raise ValueError("shared_pos=True has no transformers UMT5 equivalent")
        return {
            "model_type": "umt5",
            "vocab_size": self.vocab_size,
            "d_model": self.dim,
            "d_kv": self.head_dim,
            "d_ff": self.dim_ffn,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "relative_attention_num_buckets": self.num_buckets,
            "relative_attention_max_distance": self.max_distance,
            "layer_norm_epsilon": self.eps,
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
        }

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Any]) -> UMT5Config:
        """Infer the config from an official state dict's shapes (the .pth carries no config).

        ``num_layers`` counts the ``blocks.N.`` indices; ``vocab_size, dim`` come from
        ``token_embedding.weight``, ``dim_attn`` from ``blocks.0.attn.q.weight``, ``dim_ffn`` from
        ``blocks.0.ffn.fc1.weight``, ``num_buckets, num_heads`` from the relative-bias table
        (``blocks.0.pos_embedding.embedding.weight``, or a top-level ``pos_embedding.embedding.weight``
        meaning ``shared_pos=True``). ``max_distance`` and ``eps`` are not stored: defaults (128, 1e-6).

        Args:
            shapes: key -> shape (a tuple, ``torch.Size``, or anything with ``.shape`` such as a tensor).

        Raises:
            KeyError: a key needed above is missing.
            ValueError: no ``blocks.N.`` keys, or non-contiguous block indices.
        """

        def shape(key: str) -> tuple[int, ...]:
            value = shapes[key]
            return tuple(int(s) for s in getattr(value, "shape", value))

        indices = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
        if not indices:
            raise ValueError("no 'blocks.N.' keys: not an official UMT5 encoder state dict")
        if indices != set(range(len(indices))):
            raise ValueError(f"block indices are not 0..N-1: {sorted(indices)}")
        vocab_size, dim = shape("token_embedding.weight")
        shared_pos = "pos_embedding.embedding.weight" in shapes
        table = "pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"
        num_buckets, num_heads = shape(table)
        return cls(
            vocab_size=vocab_size,
            dim=dim,
            dim_attn=shape("blocks.0.attn.q.weight")[0],
            dim_ffn=shape("blocks.0.ffn.fc1.weight")[0],
            num_heads=num_heads,
            num_layers=len(indices),
            num_buckets=num_buckets,
            shared_pos=shared_pos,
        )


# --------------------------------------------------------------------------------------------------
# Functional pieces
# --------------------------------------------------------------------------------------------------
def relative_position_bucket(
    rel_pos: torch.Tensor, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
) -> torch.Tensor:
    """T5 relative-position buckets (Mesh TensorFlow scheme; official ``T5RelativeEmbedding``).

    Bidirectional: half the buckets per sign, ``rel > 0`` (key after query) in the upper half. Within
    a half of ``nb`` buckets, distances ``< nb/2`` get their own bucket; larger ones get
    ``nb/2 + floor(log(d / (nb/2)) / log(max_distance / (nb/2)) * (nb - nb/2))``, capped at ``nb - 1``.
    The log is taken in float32 with exactly this operation order, like the official code, so results
    at bucket boundaries agree with it.

    Args:
        rel_pos: int tensor of ``k_pos - q_pos``, any shape.
        num_buckets: Buckets over both signs (bidirectional) or one sign.
        max_distance: Distances ``>= max_distance`` share the last bucket.
        bidirectional: Encoder (True) or causal decoder (False, only ``rel <= 0`` distinguished).

    Returns:
        int64 tensor of the same shape, values in ``[0, num_buckets)``.
    """
    if bidirectional:
        num_buckets //= 2
        offset = (rel_pos > 0).long() * num_buckets
        distance = rel_pos.abs()
    else:
        offset = torch.zeros_like(rel_pos, dtype=torch.long)
        distance = (-rel_pos).clamp(min=0)
    max_exact = num_buckets // 2
    # log bucket; distance < max_exact gives log(<1) < 0 (or -inf at 0), discarded by the where below.
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance.long(), large)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: ``0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))``.

    Evaluated op by op in ``x``'s dtype, as the official ``wan/modules/t5.py::GELU`` does, so bf16
    roundings match it (``F.gelu(approximate='tanh')`` computes internally in fp32 and can differ by
    one bf16 ulp). Shape and dtype preserved.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Official ``fp16_clamp``: in fp16 only, if any value overflowed to ±inf, clamp everything to
    ±(finfo.max − 1000). Done with ``torch.where`` on a device-side flag (no host sync); a no-op for
    bf16/fp32."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isinf(x).any(), x.clamp(-limit, limit), x)


# --------------------------------------------------------------------------------------------------
# Modules (attribute names = official checkpoint keys)
# --------------------------------------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    """T5 RMSNorm: ``weight * cast_w(x.float() * rsqrt(mean(x.float()², -1) + eps))``.

    Statistics in fp32; the normalized value is cast to the weight's dtype when that is fp16/bf16
    (otherwise it stays fp32), then scaled. Input ``[..., dim]`` any float dtype; output in the
    promoted dtype of weight and normalized value. Source: official ``T5LayerNorm``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class T5Attention(nn.Module):
    """Self-attention of a UMT5 block: q, k, v, o without biases and without 1/sqrt(d) scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, L, dim]``; bias ``[B or 1, heads, L, L]`` in x's dtype (position bias with
        finfo.min at masked keys). Returns ``[B, L, dim]``.

        logits are rounded to x's dtype, the bias added in that dtype, softmax in fp32 and the
        probabilities rounded back, as in the official ``T5Attention``."""
        b, l, _ = x.shape
        n, d = self.num_heads, self.head_dim
        q = self.q(x).view(b, l, n, d).transpose(1, 2)  # [B, n, L, d]
        k = self.k(x).view(b, l, n, d).transpose(1, 2)  # [B, n, L, d]
        v = self.v(x).view(b, l, n, d).transpose(1, 2)  # [B, n, L, d]
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias  # [B, n, Lq, Lk]
        probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = torch.matmul(probs, v)  # [B, n, L, d]
        return self.o(out.transpose(1, 2).reshape(b, l, n * d))  # [B, L, dim]


class T5FeedForward(nn.Module):
    """Gated FFN: ``fc2(fc1(x) * gelu_tanh(gate.0(x)))``, no biases (official ``T5FeedForward``)."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), _GeluTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` -> ``[B, L, dim]``."""
        return self.fc2(self.fc1(x) * self.gate(x))


class _GeluTanh(nn.Module):
    """Module form of :func:`gelu_tanh` (keeps the official key ``ffn.gate.0``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class T5RelativeEmbedding(nn.Module):
    """Relative-position bias table ``embedding`` ``[num_buckets, num_heads]``."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = _embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """``buckets`` int64 ``[Lq, Lk]`` -> bias ``[1, num_heads, Lq, Lk]`` in the table's dtype."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    """Pre-norm UMT5 encoder block (official ``T5SelfAttention``)."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None if cfg.shared_pos else T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        buckets: torch.Tensor,
        key_mask: torch.Tensor | None,
        shared_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: x ``[B, L, dim]``; buckets int64 ``[L, L]``; key_mask bool ``[B, 1, 1, L]`` (True =
        real token) or None; shared_bias ``[1, n, L, L]`` when ``shared_pos``. Returns ``[B, L, dim]``."""
        pos = shared_bias if self.pos_embedding is None else self.pos_embedding(buckets)
        bias = pos.to(x.dtype)  # official: zeros(x.dtype) += pos_bias
        if key_mask is not None:
            # official masked_fill: masked keys get exactly finfo.min (not bias + min)
            bias = bias.masked_fill(~key_mask, torch.finfo(x.dtype).min)  # [B, n, L, L]
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        x = _fp16_clamp(x + self.ffn(self.norm2(x)))
        return x


class UMT5Encoder(nn.Module):
    """UMT5 encoder stack of Wan2.1 (official ``T5Encoder``, ``umt5_xxl(encoder_only=True)``).

    ``state_dict()`` keys are exactly the official ones: ``token_embedding.weight``,
    ``blocks.N.{norm1,norm2}.weight``, ``blocks.N.attn.{q,k,v,o}.weight``,
    ``blocks.N.ffn.{gate.0,fc1,fc2}.weight``, ``blocks.N.pos_embedding.embedding.weight``,
    ``norm.weight``. No buffers: the position buckets are computed in ``forward`` (an ``[L, L]`` int
    tensor, shared by all layers). Constructible under ``torch.device("meta")`` and loadable with
    ``load_state_dict(sd, assign=True)``. Runs in the weights' dtype; dropout is omitted (eval only).

    Args:
        cfg: Shapes; default UMT5-XXL (5.68 B parameters).
    """

    def __init__(self, cfg: UMT5Config | None = None) -> None:
        super().__init__()
        cfg = UMT5Config() if cfg is None else cfg
        self.cfg = cfg
        self.token_embedding = _embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads) if cfg.shared_pos else None
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    @staticmethod
    def keep_fp32(name: str) -> bool:
        """Parameters kept fp32 when the rest is loaded in bf16/fp16: none.

        The official encoder runs entirely in bf16 (``t5_dtype``), norms and relative bias included,
        and rounds the normalized activations to the norm weight's dtype; fp32 norms would change
        that, so everything follows the checkpoint dtype."""
        del name
        return False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids.

        Args:
            input_ids: int ``[B, L]`` token ids ``< vocab_size``.
            attention_mask: ``[B, L]`` (any dtype; nonzero = real token) or None (all real). Padded
                positions are masked as keys only; their own outputs are meaningless and must be
                trimmed (see :class:`TextEncoder`).

        Returns:
            ``[B, L, dim]`` in the weights' dtype.

        Raises:
            ValueError: ``input_ids`` is not 2-D or the mask's shape differs from it.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(b, l)}"
                )
            key_mask = (attention_mask != 0).view(b, 1, 1, l)  # [B, 1, 1, Lk]
        x = self.token_embedding(input_ids)  # [B, L, dim]
        pos = torch.arange(l, device=input_ids.device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance
        )  # [Lq, Lk], rel = k_pos - q_pos
        shared_bias = self.pos_embedding(buckets) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, buckets, key_mask, shared_bias)
        return self.norm(x)


# --------------------------------------------------------------------------------------------------
# Prompt cleaning and the tokenizer + encoder wrapper
# --------------------------------------------------------------------------------------------------
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Official 'whitespace' cleaning (``wan/modules/tokenizers.py``).

    ``ftfy.fix_text`` (mojibake, HTML entities, full-width ASCII such as ``，`` -> ``,``, curly quotes,
    ligatures, NFC), then ``html.unescape`` twice, strip, and every run of whitespace collapsed to one
    space.

    Raises:
        TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be str, got {type(text).__name__}")
    import ftfy  # lazy: only prompt encoding needs it

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


class TextEncoder:
    """Tokenizer + :class:`UMT5Encoder`: prompts in, per-prompt context tensors out.

    Reproduces the official ``T5EncoderModel.__call__``: clean, tokenize to exactly ``text_len``
    tokens (``padding='max_length'``, truncation, ``</s>`` appended), encode the whole batch at that
    length with the padding mask, and trim each output to its real token count (EOS included). The DiT
    zero-pads the trimmed contexts back to ``text_len`` (docs/model-reference.md §2.4).

    Args:
        tokenizer: A transformers tokenizer (``AutoTokenizer.from_pretrained(folder)``, see
            :meth:`load_tokenizer`) that appends ``</s>`` and returns ``input_ids`` and
            ``attention_mask``.
        model: The encoder; runs on its own device and dtype.
        text_len: Tokens per prompt, EOS included (512 for Wan2.1). Longer prompts are truncated.

    Raises:
        ValueError: ``text_len`` < 1.
    """

    def __init__(self, tokenizer: Any, model: UMT5Encoder, text_len: int = 512) -> None:
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.tokenizer = tokenizer
        self.model = model
        self.text_len = text_len

    @staticmethod
    def load_tokenizer(path: str) -> Any:
        """``transformers.AutoTokenizer.from_pretrained(path)`` of a local folder (e.g.
        ``<ckpt_dir>/google/umt5-xxl``); never downloads (``local_files_only=True``)."""
        from transformers import AutoTokenizer  # lazy: heavy import

        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize.

        Args:
            prompts: One prompt or a non-empty sequence of prompts (a bare str is wrapped in a list).

        Returns:
            ``(input_ids, attention_mask)``, both int64 ``[B, text_len]`` on the model's device.

        Raises:
            ValueError: empty sequence. TypeError: an element is not a str.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must be a non-empty list of str")
        texts = [clean_prompt(p) for p in prompts]
        enc = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """Encode prompts.

        Args:
            prompts: One prompt (str, wrapped into a one-element list for convenience) or a non-empty
                sequence of str.

        Returns:
            One tensor per prompt, ``[L_i, dim]`` in the model's dtype and on its device, where
            ``L_i`` = real tokens incl. ``</s>`` (``<= text_len``). Views into the batch output.

        Raises:
            ValueError: empty sequence. TypeError: an element is not a str.
        """
        ids, mask = self.tokenize(prompts)
        lens = mask.gt(0).sum(dim=1).tolist()
        if any(n >= self.text_len for n in lens):
            # The official code truncates silently; say so, since the end of the prompt is lost.
            logging.getLogger("wanrt").warning(
                "a prompt reached the %d-token limit and was truncated", self.text_len
            )
        out = self.model(ids, mask)  # [B, text_len, dim]
        return [u[:n] for u, n in zip(out, lens)]

    __call__ = encode
