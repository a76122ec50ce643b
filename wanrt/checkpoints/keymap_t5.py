"""Key map between transformers' ``UMT5EncoderModel`` and the official Wan2.1 UMT5 encoder keys.

Official keys (``models_t5_umt5-xxl-enc-bf16.pth``, docs/model-reference.md §5.2) and their
transformers twins (``google/umt5-xxl``; diffusers' Wan pipelines store ``text_encoder/`` this way)::

    token_embedding.weight                    shared.weight  (also encoder.embed_tokens.weight, tied)
    blocks.N.attn.{q,k,v,o}.weight            encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.N.pos_embedding.embedding.weight   encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.N.norm1.weight                     encoder.block.N.layer.0.layer_norm.weight
    blocks.N.ffn.gate.0.weight                encoder.block.N.layer.1.DenseReluDense.wi_0.weight
    blocks.N.ffn.fc1.weight                   encoder.block.N.layer.1.DenseReluDense.wi_1.weight
    blocks.N.ffn.fc2.weight                   encoder.block.N.layer.1.DenseReluDense.wo.weight
    blocks.N.norm2.weight                     encoder.block.N.layer.1.layer_norm.weight
    norm.weight                               encoder.final_layer_norm.weight

The tensors are identical under this renaming (no transposes, no reshapes). Both ``shared.weight`` and
``encoder.embed_tokens.weight`` map to ``token_embedding.weight``: a transformers state dict may hold
both (tied weights); :func:`t5_official_state_dict_from_hf` keeps one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["t5_to_official", "t5_from_official", "t5_official_state_dict_from_hf"]

T = TypeVar("T")

# (transformers suffix after "encoder.block.N.", official suffix after "blocks.N.")
_BLOCK_PAIRS: tuple[tuple[str, str], ...] = (
    *((f"layer.0.SelfAttention.{p}.weight", f"attn.{p}.weight") for p in "qkvo"),
    ("layer.0.SelfAttention.relative_attention_bias.weight", "pos_embedding.embedding.weight"),
    ("layer.0.layer_norm.weight", "norm1.weight"),
    ("layer.1.DenseReluDense.wi_0.weight", "ffn.gate.0.weight"),
    ("layer.1.DenseReluDense.wi_1.weight", "ffn.fc1.weight"),
    ("layer.1.DenseReluDense.wo.weight", "ffn.fc2.weight"),
    ("layer.1.layer_norm.weight", "norm2.weight"),
)
_HF_TO_OFF_BLOCK = dict(_BLOCK_PAIRS)
_OFF_TO_HF_BLOCK = {o: h for h, o in _BLOCK_PAIRS}

_HF_TO_OFF_TOP = {
    "shared.weight": "token_embedding.weight",
    "encoder.embed_tokens.weight": "token_embedding.weight",
    "encoder.final_layer_norm.weight": "norm.weight",
}
_OFF_TO_HF_TOP = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}

_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_OFF_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def t5_to_official(key: str) -> str:
    """Map a transformers ``UMT5EncoderModel`` key to the official Wan2.1 key.

    Args:
        key: e.g. ``"encoder.block.3.layer.1.DenseReluDense.wi_0.weight"``.

    Returns:
        e.g. ``"blocks.3.ffn.gate.0.weight"``. ``shared.weight`` and ``encoder.embed_tokens.weight``
        both give ``token_embedding.weight``.

    Raises:
        KeyError: the key is not part of a UMT5 encoder (e.g. ``decoder.*``, ``lm_head.*``).
    """
    if key in _HF_TO_OFF_TOP:
        return _HF_TO_OFF_TOP[key]
    m = _HF_BLOCK.fullmatch(key)
    if m and m.group(2) in _HF_TO_OFF_BLOCK:
        return f"blocks.{m.group(1)}.{_HF_TO_OFF_BLOCK[m.group(2)]}"
    raise KeyError(f"not a transformers UMT5 encoder key: {key!r}")


def t5_from_official(key: str) -> str:
    """Map an official Wan2.1 UMT5 key to the transformers ``UMT5EncoderModel`` key.

    ``token_embedding.weight`` maps to ``shared.weight`` (transformers ties ``encoder.embed_tokens``
    to it), so ``t5_from_official(t5_to_official(k)) == k`` for every key but
    ``encoder.embed_tokens.weight``.

    Raises:
        KeyError: the key is not an official UMT5 encoder key.
    """
    if key in _OFF_TO_HF_TOP:
        return _OFF_TO_HF_TOP[key]
    m = _OFF_BLOCK.fullmatch(key)
    if m and m.group(2) in _OFF_TO_HF_BLOCK:
        return f"encoder.block.{m.group(1)}.{_OFF_TO_HF_BLOCK[m.group(2)]}"
    raise KeyError(f"not an official UMT5 encoder key: {key!r}")


def t5_official_state_dict_from_hf(sd: Mapping[str, T]) -> dict[str, T]:
    """Rename a transformers UMT5 encoder state dict to official keys.

    The tied duplicate is dropped: ``shared.weight`` is kept when present, otherwise
    ``encoder.embed_tokens.weight``. Values are passed through untouched (tensors, lazy handles or
    shapes all work); their values are not compared.

    Args:
        sd: transformers key -> value.

    Returns:
        official key -> value, one entry per official key.

    Raises:
        KeyError: an unknown key (see :func:`t5_to_official`), or two distinct keys other than the
            tied embedding pair mapping to the same official key.
    """
    out: dict[str, T] = {}
    for key, value in sd.items():
        if key == "encoder.embed_tokens.weight" and "shared.weight" in sd:
            continue  # tied with shared.weight
        new = t5_to_official(key)
        if new in out:
            raise KeyError(f"two keys map to {new!r} (second: {key!r})")
        out[new] = value
    return out
