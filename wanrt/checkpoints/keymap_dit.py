"""DiT key map: diffusers ``WanTransformer3DModel`` ↔ official Wan2.1 checkpoint keys.

Pure string maps (docs/model-reference.md §3). Every key of either layout is matched
exactly (module path plus ``.weight`` / ``.bias``, or a bare parameter name), so the map is
a bijection on the keys of both layouts and an unknown key raises instead of passing
through silently. Note the block norm swap: diffusers ``norm2`` (the affine norm before
cross-attention) is official ``norm3``; norm1/norm2 of the official block have no params.
VACE models (diffusers ``WanVACETransformer3DModel``) add ``vace_patch_embedding`` and ``vace_blocks.N.``: the
block map plus ``proj_in`` / ``proj_out`` = official ``before_proj`` / ``after_proj``.
"""

from __future__ import annotations

import re

# (diffusers module or parameter, official module or parameter, is_parameter)
_TOP: tuple[tuple[str, str, bool], ...] = (
    ("patch_embedding", "patch_embedding", False),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0", False),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2", False),
    ("condition_embedder.time_proj", "time_projection.1", False),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0", False),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2", False),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0", False),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1", False),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3", False),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4", False),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos", True),
    ("proj_out", "head.head", False),
    ("scale_shift_table", "head.modulation", True),
    ("vace_patch_embedding", "vace_patch_embedding", False),
)

# Inside ``blocks.N.``.
_BLOCK: tuple[tuple[str, str, bool], ...] = (
    ("scale_shift_table", "modulation", True),
    ("attn1.to_q", "self_attn.q", False),
    ("attn1.to_k", "self_attn.k", False),
    ("attn1.to_v", "self_attn.v", False),
    ("attn1.to_out.0", "self_attn.o", False),
    ("attn1.norm_q", "self_attn.norm_q", False),
    ("attn1.norm_k", "self_attn.norm_k", False),
    ("norm2", "norm3", False),
    ("attn2.to_q", "cross_attn.q", False),
    ("attn2.to_k", "cross_attn.k", False),
    ("attn2.to_v", "cross_attn.v", False),
    ("attn2.to_out.0", "cross_attn.o", False),
    ("attn2.norm_q", "cross_attn.norm_q", False),
    ("attn2.norm_k", "cross_attn.norm_k", False),
    ("attn2.add_k_proj", "cross_attn.k_img", False),
    ("attn2.add_v_proj", "cross_attn.v_img", False),
    ("attn2.norm_added_k", "cross_attn.norm_k_img", False),
    ("ffn.net.0.proj", "ffn.0", False),
    ("ffn.net.2", "ffn.2", False),
)

# Inside ``vace_blocks.N.``: a block plus the hint stream's projections.
_VACE_BLOCK = _BLOCK + (("proj_in", "before_proj", False), ("proj_out", "after_proj", False))

_BLOCK_KEY = re.compile(r"(vace_blocks|blocks)\.(\d+)\.(.+)")


def _expand(table: tuple[tuple[str, str, bool], ...]) -> dict[str, str]:
    """Full key (relative to the table's scope) → full key, both ``.weight`` and ``.bias``."""
    out: dict[str, str] = {}
    for src, dst, is_param in table:
        if is_param:
            out[src] = dst
        else:
            for suffix in (".weight", ".bias"):
                out[src + suffix] = dst + suffix
    return out


_TO_OFFICIAL_TOP = _expand(_TOP)
_TO_OFFICIAL_BLOCK = _expand(_BLOCK)
_FROM_OFFICIAL_TOP = {v: k for k, v in _TO_OFFICIAL_TOP.items()}
_FROM_OFFICIAL_BLOCK = {v: k for k, v in _TO_OFFICIAL_BLOCK.items()}
_TO_OFFICIAL_VACE = _expand(_VACE_BLOCK)
_FROM_OFFICIAL_VACE = {v: k for k, v in _TO_OFFICIAL_VACE.items()}


def _map(key: str, top: dict[str, str], blocks: dict[str, dict[str, str]], what: str) -> str:
    m = _BLOCK_KEY.fullmatch(key)
    if m is not None and m.group(3) in blocks[m.group(1)]:
        return f"{m.group(1)}.{m.group(2)}.{blocks[m.group(1)][m.group(3)]}"
    if m is None and key in top:
        return top[key]
    raise KeyError(f"not a {what} DiT key: {key!r}")


def dit_to_official(key: str) -> str:
    """Map a diffusers ``WanTransformer3DModel`` state-dict key to the official key.

    Example: ``'blocks.0.attn2.add_k_proj.weight'`` → ``'blocks.0.cross_attn.k_img.weight'``.

    Raises:
        KeyError: if ``key`` is not a diffusers Wan2.1 DiT parameter name.
    """
    return _map(key, _TO_OFFICIAL_TOP, {"blocks": _TO_OFFICIAL_BLOCK, "vace_blocks": _TO_OFFICIAL_VACE}, "diffusers")


def dit_from_official(key: str) -> str:
    """Map an official Wan2.1 DiT key to the diffusers ``WanTransformer3DModel`` key.

    Example: ``'blocks.0.norm3.bias'`` → ``'blocks.0.norm2.bias'``.

    Raises:
        KeyError: if ``key`` is not an official Wan2.1 DiT parameter name.
    """
    return _map(key, _FROM_OFFICIAL_TOP, {"blocks": _FROM_OFFICIAL_BLOCK, "vace_blocks": _FROM_OFFICIAL_VACE},
                "official")
