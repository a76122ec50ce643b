"""Key map between diffusers ``AutoencoderKLWan`` and the official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` (``WanVAE_``).

Pure string maps (docs/model-reference.md §4.7; 194/194 keys
for the released config):

=========================================  ==========================================
diffusers                                  official
=========================================  ==========================================
``quant_conv.*`` / ``post_quant_conv.*``   ``conv1.*`` / ``conv2.*``
``{enc,dec}oder.conv_in.*``                ``{enc,dec}oder.conv1.*``
``{enc,dec}oder.mid_block.resnets.0/1``    ``{enc,dec}oder.middle.0/2``
``{enc,dec}oder.mid_block.attentions.0``   ``{enc,dec}oder.middle.1``
``{enc,dec}oder.norm_out.gamma``           ``{enc,dec}oder.head.0.gamma``
``{enc,dec}oder.conv_out.*``               ``{enc,dec}oder.head.2.*``
``encoder.down_blocks.i``                  ``encoder.downsamples.i`` (same flat index)
``decoder.up_blocks.j.resnets.k``          ``decoder.upsamples.{j*(R+2)+k}``
``decoder.up_blocks.j.upsamplers.0``       ``decoder.upsamples.{j*(R+2)+R+1}``
=========================================  ==========================================

with ``R = num_res_blocks`` (each decoder stage: R+1 residual blocks and one Resample). Inside a
residual block ``norm1.gamma/conv1/norm2.gamma/conv2/conv_shortcut`` <->
``residual.0.gamma/residual.2/residual.3.gamma/residual.6/shortcut``; attention
(``norm.gamma``, ``to_qkv``, ``proj``) and resample (``resample.1``, ``time_conv``) names are shared.

The decoder index depends on ``num_res_blocks``: pass ``config`` (anything with
``num_res_blocks`` and ``attn_scales``, e.g. :class:`wanrt.models.vae.VAEConfig`) for configs
other than Wan2.1's. With non-empty ``attn_scales`` the official decoder has attention blocks that
diffusers' decoder lacks, so decoder block keys cannot be mapped and raise.

The Wan2.2 layout (``config.is_residual``, ``Wan2.2_VAE.pth``, 196/196 keys for the released config) nests
one block per stage; every other key is as above:

=================================================  =========================================================
diffusers (``AutoencoderKLWan(is_residual=True)``)  official (``wan/modules/vae2_2.py``)
=================================================  =========================================================
``encoder.down_blocks.i.resnets.k``                ``encoder.downsamples.i.downsamples.k`` (k < R)
``encoder.down_blocks.i.downsampler``              ``encoder.downsamples.i.downsamples.R``
``decoder.up_blocks.j.resnets.k``                  ``decoder.upsamples.j.upsamples.k`` (k <= R)
``decoder.up_blocks.j.upsampler``                  ``decoder.upsamples.j.upsamples.{R+1}``
=================================================  =========================================================

The ``avg_shortcut`` modules (AvgDown3D / DupUp3D) have no parameters, so no keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "vae_to_official",
    "vae_from_official",
    "vae_key_mapper",
    "vae_state_dict_to_official",
    "vae_state_dict_from_official",
]

_T = TypeVar("_T")

# Suffixes inside one block: diffusers -> official. Attention/resample names are identical.
_RES_TO_OFFICIAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_RES_FROM_OFFICIAL = {v: k for k, v in _RES_TO_OFFICIAL.items()}
_ATTN = frozenset({"norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"})
_RESAMPLE = frozenset({"resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"})

_TOP_TO_OFFICIAL = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_TOP_FROM_OFFICIAL = {v: k for k, v in _TOP_TO_OFFICIAL.items()}
_PARAM = r"(weight|bias)"


def _config_values(config: Any) -> tuple[int, tuple[float, ...], bool]:
    if config is None:
        return 2, (), False
    return int(config.num_res_blocks), tuple(config.attn_scales), bool(getattr(config, "is_residual", False))


def _residual_to_official(key: str, nrb: int) -> str | None:
    """The Wan2.2 stage keys, diffusers -> official; None for keys shared with Wan2.1."""
    m = re.fullmatch(r"(encoder)\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsampler)\.(.+)", key) or re.fullmatch(
        r"(decoder)\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsampler)\.(.+)", key)
    if m is None:
        if re.fullmatch(r"(encoder\.down_blocks|decoder\.up_blocks)\..+", key):
            raise _bad(key, "diffusers")
        return None
    part, stage, _, res_idx, suffix = m.groups()
    official = "downsamples" if part == "encoder" else "upsamples"
    n_res = nrb if part == "encoder" else nrb + 1
    if res_idx is not None:
        if int(res_idx) >= n_res or suffix not in _RES_TO_OFFICIAL:
            raise _bad(key, "diffusers")
        return f"{part}.{official}.{stage}.{official}.{res_idx}.{_RES_TO_OFFICIAL[suffix]}"
    if suffix not in _RESAMPLE:
        raise _bad(key, "diffusers")
    return f"{part}.{official}.{stage}.{official}.{n_res}.{suffix}"


def _residual_from_official(key: str, nrb: int) -> str | None:
    """The Wan2.2 stage keys, official -> diffusers; None for keys shared with Wan2.1."""
    m = re.fullmatch(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.+)", key)
    if m is None:
        return None
    part = "encoder" if m[1].startswith("encoder") else "decoder"
    inner = "downsamples" if part == "encoder" else "upsamples"
    n_res = nrb if part == "encoder" else nrb + 1
    m2 = re.fullmatch(rf"{inner}\.(\d+)\.(.+)", m[3])
    if m2 is None:
        raise _bad(key, "official")
    idx, suffix = int(m2[1]), m2[2]
    blocks = "down_blocks" if part == "encoder" else "up_blocks"
    if idx < n_res and suffix in _RES_FROM_OFFICIAL:
        return f"{part}.{blocks}.{m[2]}.resnets.{idx}.{_RES_FROM_OFFICIAL[suffix]}"
    if idx == n_res and suffix in _RESAMPLE:
        return f"{part}.{blocks}.{m[2]}.{'downsampler' if part == 'encoder' else 'upsampler'}.{suffix}"
    raise _bad(key, "official")


def _bad(key: str, direction: str) -> ValueError:
    return ValueError(f"not a Wan-VAE key of this layout ({direction}): {key!r}")


def _block_suffix_to_official(suffix: str, key: str) -> str:
    if suffix in _RES_TO_OFFICIAL:
        return _RES_TO_OFFICIAL[suffix]
    if suffix in _ATTN or suffix in _RESAMPLE:
        return suffix
    raise _bad(key, "diffusers")


def _block_suffix_from_official(suffix: str, key: str) -> str:
    if suffix in _RES_FROM_OFFICIAL:
        return _RES_FROM_OFFICIAL[suffix]
    if suffix in _ATTN or suffix in _RESAMPLE:
        return suffix
    raise _bad(key, "official")


def vae_to_official(key: str, config: Any = None) -> str:
    """Maps a diffusers ``AutoencoderKLWan`` state-dict key to the official ``WanVAE_`` key.

    Args:
        key: e.g. ``"decoder.up_blocks.1.resnets.0.conv_shortcut.weight"``.
        config: object with ``num_res_blocks``, ``attn_scales`` and optionally ``is_residual`` (default: Wan2.1,
            2, () and False).

    Returns:
        e.g. ``"decoder.upsamples.4.shortcut.weight"``.

    Raises:
        ValueError: for a key that is not an AutoencoderKLWan (Wan2.1 layout) key, or a decoder
            block key when ``attn_scales`` is non-empty.
    """
    nrb, attn_scales, residual = _config_values(config)
    if residual and (out := _residual_to_official(key, nrb)) is not None:
        return out
    m = re.fullmatch(rf"(quant_conv|post_quant_conv)\.{_PARAM}", key)
    if m:
        return f"{_TOP_TO_OFFICIAL[m[1]]}.{m[2]}"
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.{'conv1' if m[2] == 'conv_in' else 'head.2'}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.norm_out\.gamma", key):
        return key.replace("norm_out", "head.0")
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, kind, idx, suffix = m.groups()
        if kind == "resnets" and idx in ("0", "1") and suffix in _RES_TO_OFFICIAL:
            return f"{part}.middle.{0 if idx == '0' else 2}.{_RES_TO_OFFICIAL[suffix]}"
        if kind == "attentions" and idx == "0" and suffix in _ATTN:
            return f"{part}.middle.1.{suffix}"
        raise _bad(key, "diffusers")
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.downsamples.{m[1]}.{_block_suffix_to_official(m[2], key)}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        if attn_scales:
            raise ValueError(f"cannot map decoder block key {key!r}: attn_scales={attn_scales} (diffusers has none)")
        stage, _, res_idx, suffix = m.groups()
        base = int(stage) * (nrb + 2)
        if res_idx is not None:
            if int(res_idx) > nrb or suffix not in _RES_TO_OFFICIAL:
                raise _bad(key, "diffusers")
            return f"decoder.upsamples.{base + int(res_idx)}.{_RES_TO_OFFICIAL[suffix]}"
        if suffix not in _RESAMPLE:
            raise _bad(key, "diffusers")
        return f"decoder.upsamples.{base + nrb + 1}.{suffix}"
    raise _bad(key, "diffusers")


def vae_from_official(key: str, config: Any = None) -> str:
    """Maps an official ``WanVAE_`` key to the diffusers ``AutoencoderKLWan`` key.

    Args:
        key: e.g. ``"decoder.upsamples.7.time_conv.weight"``.
        config: object with ``num_res_blocks``, ``attn_scales`` and optionally ``is_residual`` (default: Wan2.1,
            2, () and False).

    Returns:
        e.g. ``"decoder.up_blocks.1.upsamplers.0.time_conv.weight"``.

    Raises:
        ValueError: for a key that is not an official VAE key, or a decoder block key when
            ``attn_scales`` is non-empty.
    """
    nrb, attn_scales, residual = _config_values(config)
    if residual and (out := _residual_from_official(key, nrb)) is not None:
        return out
    m = re.fullmatch(rf"(conv1|conv2)\.{_PARAM}", key)
    if m:
        return f"{_TOP_FROM_OFFICIAL[m[1]]}.{m[2]}"
    m = re.fullmatch(rf"(encoder|decoder)\.(conv1|head\.2)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.{'conv_in' if m[2] == 'conv1' else 'conv_out'}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.head\.0\.gamma", key):
        return key.replace("head.0", "norm_out")
    m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d+)\.(.+)", key)
    if m:
        part, idx, suffix = m.groups()
        if idx in ("0", "2") and suffix in _RES_FROM_OFFICIAL:
            return f"{part}.mid_block.resnets.{0 if idx == '0' else 1}.{_RES_FROM_OFFICIAL[suffix]}"
        if idx == "1" and suffix in _ATTN:
            return f"{part}.mid_block.attentions.0.{suffix}"
        raise _bad(key, "official")
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.{_block_suffix_from_official(m[2], key)}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if m:
        if attn_scales:
            raise ValueError(f"cannot map decoder block key {key!r}: attn_scales={attn_scales} (diffusers has none)")
        stage, pos = divmod(int(m[1]), nrb + 2)
        suffix = m[2]
        if pos <= nrb and suffix in _RES_FROM_OFFICIAL:
            return f"decoder.up_blocks.{stage}.resnets.{pos}.{_RES_FROM_OFFICIAL[suffix]}"
        if pos == nrb + 1 and suffix in _RESAMPLE:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{suffix}"
        raise _bad(key, "official")
    raise _bad(key, "official")


def vae_key_mapper(to: str, config: Any = None) -> Callable[[str], str]:
    """The one-argument key map ``key -> key`` of a VAE config, for loaders and writers.

    Args:
        to: ``"official"``: diffusers -> official keys (:func:`vae_to_official`; loading a diffusers file);
            ``"diffusers"``: official -> diffusers keys (:func:`vae_from_official`; writing one).
        config: object with ``num_res_blocks``, ``attn_scales`` and optionally ``is_residual`` (default: Wan2.1,
            2, () and False).

    Returns:
        ``mapper(key)``, raising ``ValueError`` as the map it wraps.

    Raises:
        ValueError: ``to`` is neither ``"official"`` nor ``"diffusers"``.
    """
    if to == "official":
        fn = vae_to_official
    elif to == "diffusers":
        fn = vae_from_official
    else:
        raise ValueError(f"vae_key_mapper: to must be 'official' or 'diffusers', got {to!r}")

    def mapper(key: str) -> str:
        return fn(key, config)

    return mapper


def vae_state_dict_to_official(state_dict: Mapping[str, _T], *, config: Any = None) -> dict[str, _T]:
    """Renames a diffusers ``AutoencoderKLWan`` state dict to official keys (values untouched).

    Raises:
        ValueError: on an unknown key, or if two keys map to the same official key.
    """
    out: dict[str, _T] = {}
    for key, value in state_dict.items():
        new = vae_to_official(key, config=config)
        if new in out:
            raise ValueError(f"duplicate official key {new!r} (from {key!r})")
        out[new] = value
    return out


def vae_state_dict_from_official(state_dict: Mapping[str, _T], *, config: Any = None) -> dict[str, _T]:
    """Renames an official VAE state dict to diffusers ``AutoencoderKLWan`` keys (values untouched).

    Raises:
        ValueError: on an unknown key, or if two keys map to the same diffusers key.
    """
    out: dict[str, _T] = {}
    for key, value in state_dict.items():
        new = vae_from_official(key, config=config)
        if new in out:
            raise ValueError(f"duplicate diffusers key {new!r} (from {key!r})")
        out[new] = value
    return out
