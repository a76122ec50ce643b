"""LoRA files in the formats users download, read into one form: per target of the DiT, its low-rank pair and scale
and its full differences.

Formats (detected from the keys, not the file name):

* diffusers / PEFT: ``transformer.blocks.N.attn1.to_q.lora_A.weight`` / ``lora_B`` (diffusers module names, mapped
  to the official ones with :mod:`wanrt.checkpoints.keymap_dit`); ``lora_B.bias`` is a bias difference;
* official / ComfyUI: ``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` / ``lora_B``, or ``lora_down`` /
  ``lora_up``, with an optional ``.alpha``;
* kohya / musubi-tuner: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` / ``lora_up`` / ``.alpha`` (the module
  path with ``_`` for ``.``, resolved against the model's own module names);
* DiffSynth: ``blocks.N.self_attn.q.lora_A.default.weight`` (``pipe.dit.`` prefix);
* full differences (LightX2V and others): ``.diff`` (a weight, or a parameter such as ``modulation``), ``.diff_b``
  (a bias), ``.diff_m`` (the ``modulation`` table of the block or head that carries it).

The prefixes ``base_model.model.``, ``pipe.dit.``, ``model.diffusion_model.``, ``diffusion_model.``,
``transformer.`` and ``unet.`` are stripped. LyCORIS (LoKr, LoHa), OFT and DoRA files are refused with the format's
name. Scale: ``alpha / rank`` with an alpha, else 1 (the user's strength multiplies it).

Source of the conventions: the LoRA paper (Hu et al. 2021, ``W + (alpha/r) B A``), PEFT's and kohya's key layouts,
and the Wan-specific keys listed in ``docs`` (field notes).
"""

from __future__ import annotations

import logging
import math

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("wanrt")

PREFIXES = ("base_model.model.", "pipe.dit.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
# (suffix, what it holds), longest first within a family
_SUFFIXES = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "diff_b"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"), (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# substrings of keys of adapter types that are not LoRA, and their names
_REFUSED = (("lokr_", "LyCORIS LoKr"), ("hada_", "LyCORIS LoHa"), ("dora_scale", "DoRA"),
            ("lora_magnitude_vector", "DoRA (PEFT)"), ("oft_", "OFT"), ("boft_", "BOFT"), ("lora_mid", "LyCORIS LoCon"))


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model: the message names the file and the key."""


@dataclass
class Delta:
    """What one LoRA does to one target of the DiT.

    Attributes:
        target: the official name of a module with a ``weight`` (``blocks.0.self_attn.q``) or of a parameter
            (``blocks.0.modulation``).
        A: ``[r, in]`` and B: ``[out, r]`` (float32), or None; the low-rank update is ``scale · B @ A``.
        scale: ``alpha / r`` (1 without an alpha).
        diff: a full difference of the weight (or of the parameter), float32, or None.
        diff_b: a difference of the bias ``[out]``, float32, or None.
    """

    target: str
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 1.0
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.A is None else int(self.A.shape[0])


@dataclass
class LoraAdapter:
    """A LoRA file read for one model: its format, and a :class:`Delta` per target it touches."""

    name: str
    source: str
    format: str
    deltas: dict[str, Delta] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def describe(self) -> str:
        ranks = sorted({d.rank for d in self.deltas.values() if d.rank})
        return (f"{self.name} ({self.format}, {len(self.deltas)} targets"
                + (f", rank {'/'.join(map(str, ranks))}" if ranks else "") + ")")


def load_state_dict(source) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, what to call it in messages)`` from a path (``.safetensors``, ``.pt``/``.pth``/``.bin``) or a
    dict of tensors.

    Raises:
        FileNotFoundError: no such file. LoraError: a file that cannot be read (names it).
    """
    if isinstance(source, dict):
        return dict(source), "<state dict>"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), str(path)
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraError(f"{path}: cannot read the LoRA file: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoraError(f"{path}: expected a state dict of tensors")
    return sd, str(path)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _split(key: str) -> tuple[str, str] | None:
    """``(module path, kind)`` of a normalized key, or None for a key of no known kind."""
    if key.startswith("lora_unet_"):  # kohya: the module path up to the first dot
        module, _, rest = key.partition(".")
        key_rest = "." + rest
        for suffix, kind in _SUFFIXES:
            if key_rest == suffix:
                return module, kind
        return None
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


class _Targets:
    """The names a LoRA may address in ``model``: official modules with a weight and parameters, their diffusers
    names, and the kohya underscored forms."""

    def __init__(self, model: nn.Module):
        from ..checkpoints.keymap_dit import dit_from_official

        self.model = model
        self.modules: dict[str, nn.Module] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.alias: dict[str, str] = {}  # diffusers or kohya name -> official
        for name, m in model.named_modules():
            if name and isinstance(getattr(m, "weight", None), torch.Tensor):
                self.modules[name] = m
                self._aliases(name, dit_from_official, name + ".weight", ".weight")
        for name, p in model.named_parameters():
            if not name.endswith((".weight", ".bias")):
                self.params[name] = p
                self._aliases(name, dit_from_official, name, "")

    def _aliases(self, official: str, to_diffusers, key: str, suffix: str) -> None:
        self.alias["lora_unet_" + official.replace(".", "_")] = official
        try:
            diffusers = to_diffusers(key)
        except KeyError:
            return
        diffusers = diffusers[: len(diffusers) - len(suffix)] if suffix else diffusers
        self.alias.setdefault(diffusers, official)
        self.alias.setdefault("lora_unet_" + diffusers.replace(".", "_"), official)

    def resolve(self, module: str) -> str | None:
        if module in self.modules or module in self.params:
            return module
        return self.alias.get(module)


def _format_name(keys: list[str], diffusers_names: bool) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".default." in k for k in keys):
        return "DiffSynth"
    if all(k.endswith((".diff", ".diff_b", ".diff_m")) for k in keys):
        return "full differences"
    if diffusers_names:
        return "diffusers/PEFT"
    return "official/ComfyUI"


def read_lora(source, model: nn.Module, name: str | None = None) -> LoraAdapter:
    """Read a LoRA (a path or a state dict) for ``model`` (a :class:`~wanrt.models.dit.WanDiT`).

    Args:
        source: a ``.safetensors`` / ``.pt`` file or a ``{key: tensor}`` dict in any format of the module docstring.
        model: the DiT it will be applied to (its module names and shapes are checked).
        name: the adapter's name (default: the file's stem, or ``"lora"``).

    Returns:
        A :class:`LoraAdapter` (tensors float32 on the CPU).

    Raises:
        LoraError: a refused adapter type (names it); no key matching the model (names three); a shape that does
            not fit (names the key and both shapes); a low-rank pair without its other half, or on a layer that
            is not a Linear. A file with some unmatched keys logs one warning with their count and three examples
            (a T2V LoRA on an I2V model touches the layers both have; an I2V LoRA's image k/v on T2V are skipped).
    """
    sd, what = load_state_dict(source)
    if name is None:
        name = Path(what).stem if what != "<state dict>" else "lora"
    for key in sd:
        for mark, fmt in _REFUSED:
            if mark in key:
                raise LoraError(f"{what}: a {fmt} adapter (key {key!r}); wanrt applies LoRA (low-rank pairs) and "
                                "full differences only")
    targets = _Targets(model)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    diffusers_names = False
    for key, value in sd.items():
        norm = _strip(key)
        split = _split(norm)
        if split is None:
            unmatched.append(key)
            continue
        module, kind = split
        if kind == "diff_m":  # the modulation table of the module that carries it
            module, kind = (module + ".modulation" if module else "modulation"), "diff"
        target = targets.resolve(module)
        if target is None:
            unmatched.append(key)
            continue
        diffusers_names |= target != module and not module.startswith("lora_unet_")
        slot = groups.setdefault(target, {})
        if kind in slot:
            raise LoraError(f"{what}: keys {slot[kind][0]!r} and {key!r} both give the {kind} of {target!r}")
        slot[kind] = (key, value)
    if not groups:
        examples = ", ".join(repr(k) for k in list(sd)[:3])
        raise LoraError(f"{what}: no key matches this model (e.g. {examples}); is it a LoRA for a Wan2.1 DiT?")
    if unmatched:
        log.warning("LoRA %s: %d keys match no layer of this model and are skipped (e.g. %s)", what, len(unmatched),
                    ", ".join(repr(k) for k in unmatched[:3]))
    adapter = LoraAdapter(name, what, _format_name(list(sd), diffusers_names), unmatched=unmatched)
    for target, parts in groups.items():
        adapter.deltas[target] = _delta(target, parts, targets, what)
    return adapter


def _shape_error(what: str, key: str, got, want) -> LoraError:
    return LoraError(f"{what}: {key!r} has shape {list(got)}, the model's layer needs {list(want)} "
                     "(a LoRA for another model size?)")


def _delta(target: str, parts: dict[str, tuple[str, torch.Tensor]], targets: _Targets, what: str) -> Delta:
    d = Delta(target)
    module = targets.modules.get(target)
    param = targets.params.get(target)
    if "A" in parts or "B" in parts:
        if "A" not in parts or "B" not in parts:
            key = (parts.get("A") or parts.get("B"))[0]
            raise LoraError(f"{what}: {key!r} has no {'up (B)' if 'A' in parts else 'down (A)'} matrix beside it")
        (ka, a), (kb, b) = parts["A"], parts["B"]
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if module is None or out_f is None or in_f is None:
            raise LoraError(f"{what}: {ka!r} targets {target!r}, which is not a Linear layer")
        a, b = a.float().reshape(a.shape[0], -1), b.float().reshape(b.shape[0], -1)
        if a.shape[1] != in_f:
            raise _shape_error(what, ka, a.shape, (a.shape[0], in_f))
        if b.shape[0] != out_f or b.shape[1] != a.shape[0]:
            raise _shape_error(what, kb, b.shape, (out_f, a.shape[0]))
        d.A, d.B = a, b
        if "alpha" in parts:
            d.scale = float(parts["alpha"][1].float().reshape(-1)[0]) / a.shape[0]
    if "diff" in parts:
        key, diff = parts["diff"]
        want = tuple(param.shape) if param is not None else tuple(module.weight.shape)
        if module is not None and getattr(module, "in_features", None) is not None:
            want = (module.out_features, module.in_features)  # 8-bit / GGUF layers: the logical weight
        if diff.numel() != math.prod(want):
            raise _shape_error(what, key, diff.shape, want)
        d.diff = diff.float().reshape(want)
    if "diff_b" in parts:
        key, db = parts["diff_b"]
        bias = getattr(module, "bias", None) if module is not None else None
        if bias is None:
            raise LoraError(f"{what}: {key!r} changes the bias of {target!r}, which has none")
        if db.numel() != bias.numel():
            raise _shape_error(what, key, db.shape, bias.shape)
        d.diff_b = db.float().reshape(bias.shape)
    return d
