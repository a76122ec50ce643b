"""Key maps of Wan2.1's CLIP visual tower: official <-> wanrt, transformers ``CLIPVisionModel`` <-> wanrt.

wanrt's :class:`~wanrt.models.clip.CLIPVisionTower` keys are the official ones without ``visual.``.
Official keys (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, the whole XLM-RoBERTa
CLIP, docs/model-reference.md §5.4) and their transformers twins (diffusers' ``image_encoder/``; files
written by transformers 4.x carry the ``vision_model.`` prefix, transformers 5.x drops it)::

    visual.patch_embedding.weight         [D,3,p,p]   embeddings.patch_embedding.weight      same
    visual.cls_embedding                  [1,1,D]     embeddings.class_embedding             [D]
    visual.pos_embedding                  [1,T,D]     embeddings.position_embedding.weight   [T,D]
    visual.pre_norm.{weight,bias}                     pre_layrnorm.{weight,bias}
    visual.transformer.N.norm1.*                      encoder.layers.N.layer_norm1.*
    visual.transformer.N.attn.to_qkv.*    [3D,D]      encoder.layers.N.self_attn.{q,k,v}_proj.*  [D,D] each,
                                                      rows [0:D] = q, [D:2D] = k, [2D:3D] = v
    visual.transformer.N.attn.proj.*                  encoder.layers.N.self_attn.out_proj.*
    visual.transformer.N.norm2.*                      encoder.layers.N.layer_norm2.*
    visual.transformer.N.mlp.0.*                      encoder.layers.N.mlp.fc1.*
    visual.transformer.N.mlp.2.*                      encoder.layers.N.mlp.fc2.*
    visual.post_norm.*                                post_layernorm.*                   (unused: dropped)
    visual.head                           [D,1024]    (CLIPVisionModelWithProjection: visual_projection)

Wan uses the output of the penultimate block only, so the last block, ``post_norm``/``post_layernorm``
and the projection heads are dropped when loading, as are the text tower (``textual.*``,
``text_model.*``) and the logit scale. Because transformers splits q/k/v and stores the class and
position embeddings flat, :class:`TransformersCLIPSource` presents a transformers file under wanrt's
key names for :func:`~wanrt.checkpoints.io.load_into_module`.

:func:`transformers_clip_vision` converts a full official state dict (e.g. the random one of
:func:`wanrt.checkpoints.tiny.official_clip_state`) to a transformers ``CLIPVisionModel`` checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .io import CheckpointError, TensorSource

__all__ = [
    "clip_from_official",
    "clip_to_official",
    "clip_from_transformers",
    "clip_to_transformers",
    "is_transformers_clip_key",
    "TransformersCLIPSource",
    "transformers_clip_vision",
]

OFFICIAL_PREFIX = "visual."
HF_PREFIX = "vision_model."

_OFF_BLOCK = re.compile(r"transformer\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OFF_BLOCK_PARTS = tuple(f"{m}.{p}" for m in ("norm1", "attn.to_qkv", "attn.proj", "norm2", "mlp.0", "mlp.2")
                         for p in ("weight", "bias"))
_OFF_TOP = ("patch_embedding.weight", "cls_embedding", "pos_embedding", "pre_norm.weight", "pre_norm.bias")
_OFF_DROPPED_TOP = ("head", "post_norm.weight", "post_norm.bias")

# transformers suffix after "encoder.layers.N." -> official suffix after "transformer.N." (q/k/v apart)
_HF_BLOCK_PAIRS: dict[str, str] = {
    **{f"layer_norm1.{p}": f"norm1.{p}" for p in ("weight", "bias")},
    **{f"self_attn.out_proj.{p}": f"attn.proj.{p}" for p in ("weight", "bias")},
    **{f"layer_norm2.{p}": f"norm2.{p}" for p in ("weight", "bias")},
    **{f"mlp.fc1.{p}": f"mlp.0.{p}" for p in ("weight", "bias")},
    **{f"mlp.fc2.{p}": f"mlp.2.{p}" for p in ("weight", "bias")},
}
_OFF_BLOCK_TO_HF = {o: h for h, o in _HF_BLOCK_PAIRS.items()}
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_HF_TOP: dict[str, str] = {
    "embeddings.patch_embedding.weight": "patch_embedding.weight",
    "embeddings.class_embedding": "cls_embedding",
    "embeddings.position_embedding.weight": "pos_embedding",
    "pre_layrnorm.weight": "pre_norm.weight",
    "pre_layrnorm.bias": "pre_norm.bias",
}
_OFF_TOP_TO_HF = {o: h for h, o in _HF_TOP.items()}
_HF_DROPPED_TOP = ("embeddings.position_ids", "post_layernorm.weight", "post_layernorm.bias")
_HF_DROPPED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


# --------------------------------------------------------------------------------------------------
# Official <-> wanrt
# --------------------------------------------------------------------------------------------------
def clip_from_official(key: str, used_layers: int) -> str | None:
    """Map an official CLIP key to the :class:`CLIPVisionTower` key.

    Args:
        key: e.g. ``"visual.transformer.3.attn.to_qkv.weight"``.
        used_layers: Blocks the tower builds (``cfg.used_layers``); blocks ``>=`` it are dropped.

    Returns:
        e.g. ``"transformer.3.attn.to_qkv.weight"``, or None for keys Wan never uses: ``textual.*``,
        ``log_scale``, ``visual.head``, ``visual.post_norm.*`` and blocks ``N >= used_layers``.

    Raises:
        KeyError: not a key of the official XLM-RoBERTa CLIP (e.g. ``visual.foo``).
    """
    if key.startswith("textual.") or key == "log_scale":
        return None
    if not key.startswith(OFFICIAL_PREFIX):
        raise KeyError(f"not an official CLIP key: {key!r}")
    rest = key[len(OFFICIAL_PREFIX):]
    if rest in _OFF_TOP:
        return rest
    if rest in _OFF_DROPPED_TOP:
        return None
    m = _OFF_BLOCK.fullmatch(rest)
    if m and m.group(2) in _OFF_BLOCK_PARTS:
        return rest if int(m.group(1)) < used_layers else None
    raise KeyError(f"not an official CLIP visual key: {key!r}")


def clip_to_official(key: str) -> str:
    """Map a :class:`CLIPVisionTower` key to the official key (adds ``visual.``).

    Raises:
        KeyError: not a key of the tower.
    """
    m = _OFF_BLOCK.fullmatch(key)
    if key in _OFF_TOP or (m and m.group(2) in _OFF_BLOCK_PARTS):
        return OFFICIAL_PREFIX + key
    raise KeyError(f"not a CLIPVisionTower key: {key!r}")


# --------------------------------------------------------------------------------------------------
# transformers <-> wanrt
# --------------------------------------------------------------------------------------------------
def is_transformers_clip_key(key: str) -> bool:
    """True for a transformers ``CLIPVisionModel`` tower key (with or without ``vision_model.``)."""
    rest = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
    return rest.startswith(("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm."))


def clip_from_transformers(key: str, used_layers: int) -> tuple[str, int | None] | None:
    """Map a transformers ``CLIPVisionModel`` key to the :class:`CLIPVisionTower` key.

    Args:
        key: e.g. ``"vision_model.encoder.layers.3.self_attn.k_proj.weight"`` (the ``vision_model.``
            prefix is optional).
        used_layers: Blocks the tower builds; layers ``>=`` it are dropped.

    Returns:
        ``(tower key, slot)``: slot 0/1/2 says which third of ``to_qkv`` a ``q/k/v_proj`` tensor is
        (rows ``[slot·D, (slot+1)·D)``), None for one-to-one keys; e.g. ``("transformer.3.attn.to_qkv.
        weight", 1)``. The class and position embeddings need a reshape (see
        :class:`TransformersCLIPSource`). None (drop) for ``post_layernorm``, ``position_ids``, layers
        ``N >= used_layers``, and the text tower / projections / ``logit_scale`` of a full ``CLIPModel``.

    Raises:
        KeyError: not a CLIP key.
    """
    if key.startswith(_HF_DROPPED_PREFIXES):
        return None
    rest = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
    if rest in _HF_TOP:
        return _HF_TOP[rest], None
    if rest in _HF_DROPPED_TOP:
        return None
    m = _HF_BLOCK.fullmatch(rest)
    if m:
        n, part = int(m.group(1)), m.group(2)
        qkv = _HF_QKV.fullmatch(part)
        if part in _HF_BLOCK_PAIRS or qkv:
            if n >= used_layers:
                return None
            if qkv:
                return f"transformer.{n}.attn.to_qkv.{qkv.group(2)}", "qkv".index(qkv.group(1))
            return f"transformer.{n}.{_HF_BLOCK_PAIRS[part]}", None
    raise KeyError(f"not a transformers CLIPVisionModel key: {key!r}")


def clip_to_transformers(key: str, prefix: str = "") -> tuple[str, ...]:
    """Map a :class:`CLIPVisionTower` key to its transformers key(s).

    Args:
        key: A tower key, e.g. ``"transformer.0.attn.to_qkv.bias"``.
        prefix: Prepended to every result (``"vision_model."`` for files written by transformers 4.x).

    Returns:
        One key, or for ``to_qkv`` the three keys of q, k, v in row order.

    Raises:
        KeyError: not a key of the tower.
    """
    if key in _OFF_TOP_TO_HF:
        return (prefix + _OFF_TOP_TO_HF[key],)
    m = _OFF_BLOCK.fullmatch(key)
    if m:
        n, part = m.group(1), m.group(2)
        if part.startswith("attn.to_qkv."):
            leaf = part.rsplit(".", 1)[1]
            return tuple(f"{prefix}encoder.layers.{n}.self_attn.{c}_proj.{leaf}" for c in "qkv")
        if part in _OFF_BLOCK_TO_HF:
            return (f"{prefix}encoder.layers.{n}.{_OFF_BLOCK_TO_HF[part]}",)
    raise KeyError(f"not a CLIPVisionTower key: {key!r}")


class TransformersCLIPSource:
    """A transformers ``CLIPVisionModel`` :class:`~wanrt.checkpoints.io.TensorSource` seen under
    :class:`CLIPVisionTower` keys, for :func:`~wanrt.checkpoints.io.load_into_module`.

    ``get("transformer.N.attn.to_qkv.weight")`` reads q, k, v and concatenates them along dim 0
    (``[3D, D]``); ``cls_embedding`` is ``class_embedding`` viewed ``[1, 1, D]``; ``pos_embedding`` is
    ``position_embedding.weight`` viewed ``[1, T, D]``; other keys are renamed only. Dropped keys (see
    :func:`clip_from_transformers`) are hidden; keys the map does not know are exposed under their own
    name, so ``load_into_module`` reports them as unexpected with their file. Shapes are computed from
    the headers (nothing is read until ``get``). Does not own ``source``: ``close()`` is a no-op.

    Args:
        source: The opened transformers weights.
        used_layers: Blocks the tower builds (``cfg.used_layers``).

    Raises:
        CheckpointError: a ``to_qkv`` group with one or two of q/k/v missing, or q/k/v of different
            shapes (names the file and the transformers key).
    """

    def __init__(self, source: TensorSource, used_layers: int) -> None:
        self.source = source
        self.metadata = getattr(source, "metadata", {})
        self._parts: dict[str, list[str | None]] = {}  # tower key -> source keys (3 slots for to_qkv)
        for src_key in source.keys():
            try:
                mapped = clip_from_transformers(src_key, used_layers)
            except KeyError:
                self._parts.setdefault(src_key, [src_key])  # unknown: exposed as is -> "unexpected"
                continue
            if mapped is None:
                continue
            key, slot = mapped
            if slot is None:
                self._parts[key] = [src_key]
            else:
                self._parts.setdefault(key, [None, None, None])[slot] = src_key
        for key, parts in self._parts.items():
            if len(parts) == 3:
                present = [p for p in parts if p is not None]
                if len(present) < 3:
                    prefix = HF_PREFIX if present[0].startswith(HF_PREFIX) else ""
                    missing = [t for t, p in zip(clip_to_transformers(key, prefix), parts) if p is None]
                    raise CheckpointError(
                        f"image encoder: {present[0]!r} has no {'/'.join(m.rsplit('.', 2)[-2] for m in missing)} "
                        "partner (q, k and v projections are fused into one to_qkv)",
                        source.file_of(present[0]), missing[0],
                    )
                shapes = {source.shape(p) for p in present}
                if len(shapes) > 1:
                    raise CheckpointError(
                        f"image encoder: q/k/v projections of different shapes {sorted(shapes)}",
                        source.file_of(present[0]), present[0],
                    )

    def source_keys(self, key: str) -> list[str]:
        """The transformers key(s) behind a tower key."""
        return list(self._parts[key])

    def keys(self) -> list[str]:
        """Tower keys (and unknown source keys under their own names)."""
        return list(self._parts)

    def __contains__(self, key: str) -> bool:
        return key in self._parts

    def __len__(self) -> int:
        return len(self._parts)

    def file_of(self, key: str) -> Path:
        """The file that stores (the first part of) ``key``."""
        return self.source.file_of(self._parts[key][0])

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape ``get(key)`` will have, from the headers only."""
        parts = self._parts[key]
        first = tuple(self.source.shape(parts[0]))
        if len(parts) == 3:
            return (3 * first[0], *first[1:])
        if key == "cls_embedding" and len(first) == 1:
            return (1, 1, first[0])
        if key == "pos_embedding" and len(first) == 2:
            return (1, *first)
        return first

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``key -> shape`` for every exposed key (headers only)."""
        return {k: self.shape(k) for k in self._parts}

    def dtype_name(self, key: str) -> str:
        """The stored dtype of (the first part of) ``key``, as safetensors names it."""
        return self.source.dtype_name(self._parts[key][0])

    def get(self, key: str) -> torch.Tensor:
        """Read one tower tensor (CPU, stored dtype). Raises CheckpointError naming the file and key."""
        if key not in self._parts:
            raise CheckpointError("key not in checkpoint", self.describe(), key)
        parts = self._parts[key]
        if len(parts) == 3:
            return torch.cat([self.source.get(p) for p in parts], dim=0)  # [3D, ...] rows q, k, v
        t = self.source.get(parts[0])
        return t.reshape(self.shape(key)) if key in ("cls_embedding", "pos_embedding") else t

    def describe(self) -> str:
        """The files behind the source, for messages."""
        return self.source.describe()

    def close(self) -> None:
        """No-op: the wrapped source is closed by its owner."""

    def __enter__(self) -> TransformersCLIPSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Official -> transformers state dict (diffusers' image_encoder/ of tiny checkpoints, tests)
# --------------------------------------------------------------------------------------------------
def transformers_clip_vision(
    official_state: dict[str, torch.Tensor], cfg: Any, *, prefix: str = HF_PREFIX
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a FULL official CLIP state dict to a transformers ``CLIPVisionModel`` checkpoint.

    Args:
        official_state: e.g. from :func:`wanrt.checkpoints.tiny.official_clip_state`: all
            ``cfg.num_layers`` blocks and ``visual.post_norm.*`` (``visual.head`` gives the config's
            ``projection_dim``; the text tower is ignored).
        cfg: Its :class:`~wanrt.models.clip.CLIPVisionConfig`.
        prefix: Key prefix: ``"vision_model."`` (default) as in the files of diffusers' Wan I2V
            ``image_encoder/`` (written by transformers 4.x; transformers 5.x reads them too), or
            ``""`` for ``CLIPVisionModel(...).load_state_dict`` under transformers 5.x.

    Returns:
        ``(config_dict, state_dict)``: the ``config.json`` content (with ``architectures``) and
        ``key -> tensor`` with all ``num_layers`` layers and ``post_layernorm``, each tensor its own
        contiguous copy (ready for ``safetensors.torch.save_file``).

    Raises:
        KeyError: a needed official key is missing.
    """
    config = {"architectures": ["CLIPVisionModel"], **cfg.to_hf_config(
        projection_dim=int(official_state["visual.head"].shape[1]) if "visual.head" in official_state else 1024)}
    out: dict[str, torch.Tensor] = {}
    tower_keys = list(_OFF_TOP) + [f"transformer.{n}.{p}" for n in range(cfg.num_layers) for p in _OFF_BLOCK_PARTS]
    for key in tower_keys:
        value = official_state[OFFICIAL_PREFIX + key]
        names = clip_to_transformers(key, prefix)
        if len(names) == 3:
            for name, part in zip(names, value.chunk(3, dim=0)):
                out[name] = part.clone()
        elif key == "cls_embedding":
            out[names[0]] = value.reshape(cfg.dim).clone()
        elif key == "pos_embedding":
            out[names[0]] = value.reshape(cfg.num_tokens, cfg.dim).clone()
        else:
            out[names[0]] = value.clone()
    for leaf in ("weight", "bias"):
        out[f"{prefix}post_layernorm.{leaf}"] = official_state[f"visual.post_norm.{leaf}"].clone()
    return config, out
