"""Model presets: the architecture each Wan2.1 checkpoint should have and its official sampling defaults.

A preset never builds a model: the architecture is always read from the checkpoint's own config
(official ``config.json`` or the diffusers configs). The preset supplies sampling defaults and is
checked against the checkpoint when both are given (:func:`check_against`).

Sources: ``wan/configs/*.py`` and ``generate.py::_validate_args`` of the official Wan2.1 code
(docs/model-reference.md §1).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    from .models.dit_config import DiTConfig

#: The official default negative prompt (``shared_config.sample_neg_prompt``).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
#: i2v prepends this to the negative prompt; flf2v prepends "镜头切换，" to the i2v one.
I2V_NEGATIVE_PROMPT = "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT

#: The model types (``DiTConfig.model_type``, ``Architecture.model_type``) and preset tasks.
TASKS = ("t2v", "i2v", "flf2v", "vace", "ti2v")


log = logging.getLogger("wanrt")


@dataclass(frozen=True)
class Architecture:
    """The DiT hyper-parameters a preset expects, compared with a checkpoint's (:meth:`from_dit`).

    Attributes:
        model_type: "t2v", "i2v", "flf2v" or "vace".
        dim: hidden size of the DiT residual stream.
        ffn_dim: hidden size of the feed-forward network.
        num_heads: attention heads (head_dim = dim / num_heads).
        num_layers: number of DiT blocks.
        in_dim: input latent channels (16 for t2v; 36 = 16 noise + 4 mask + 16 condition for i2v/flf2v).
        out_dim: output channels (16).
        text_dim: width of the text-encoder output (4096 for UMT5-XXL).
        text_len: number of text tokens the context is zero-padded to (512).
        image_dim: width of the CLIP image features the DiT projects (1280 for ViT-H/14; i2v/flf2v only).
        vace_layers: the blocks a VACE model adds its hints after (vace only; see ``DiTConfig.vace_layers``).
    """

    model_type: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int = 1280
    vace_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in TASKS:
            raise ValueError(f"model_type must be one of {TASKS}, got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_dit(cls, cfg: DiTConfig) -> Architecture:
        """The architecture of a loaded DiT (``model.config``): the config's fields of the same names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Preset:
    """One Wan2.1 model: expected architecture and official sampling defaults.

    Attributes:
        name: preset name used by ``Engine(name)`` and ``wanrt generate --model``.
        task: "t2v", "i2v", "flf2v" or "vace".
        arch: the expected DiT architecture.
        height, width: default output size in pixels (multiples of 16).
        num_frames: default frame count (4k+1).
        num_inference_steps: default denoising steps.
        guidance_scale: default classifier-free guidance scale.
        shift: default flow-matching sigma shift.
        sample_solver: default solver ("unipc", "dpm++" or "euler").
        negative_prompt: used when the caller gives none (the official behaviour).
        fps: frame rate of the saved video (Wan's native 16 fps).
        supported_sizes: (height, width) pairs the official code supports for this model.
        fixture_archs: other architectures a checkpoint of this preset may have: for ``tiny``, the random test
            checkpoints (:data:`TINY_FIXTURE_ARCH`) beside the trained model. A loaded checkpoint of one of them
            gets the preset with that architecture (:meth:`for_arch`).

    For the image tasks (i2v, flf2v) ``height * width`` is the default *max area*: the output size follows
    the input image's aspect ratio (:attr:`max_area`, ``docs/model-reference.md`` §7.2).
    """

    name: str
    task: str
    arch: Architecture
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0
    sample_solver: str = "unipc"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    fps: int = 16
    supported_sizes: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    fixture_archs: tuple[Architecture, ...] = ()

    def for_arch(self, arch: Architecture | Mapping[str, object]) -> Preset | None:
        """This preset if ``arch`` (a checkpoint's, or some of its fields) is :attr:`arch`; the preset with the
        fixture architecture ``arch`` matches (:attr:`fixture_archs`); else None. Compared on the fields
        :func:`check_against` compares."""
        fields = _fields(arch)
        for i, candidate in enumerate((self.arch, *self.fixture_archs)):
            if not _differences(self, candidate, fields):
                return self if i == 0 else dataclasses.replace(self, arch=candidate)
        return None

    def __post_init__(self) -> None:
        if self.task != self.arch.model_type:
            raise ValueError(f"preset {self.name}: task {self.task} != arch.model_type {self.arch.model_type}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"preset {self.name}: default size must be multiples of 16")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"preset {self.name}: default num_frames must be 4k+1")

    @property
    def max_area(self) -> int | None:
        """Default pixel area of the output for i2v/flf2v (and VACE's source video) (``height * width``; the official ``--size`` read as
        an area), None for t2v."""
        return self.height * self.width if self.task != "t2v" else None


_SIZES_14B = ((720, 1280), (1280, 720), (480, 832), (832, 480))
_SIZES_13B = ((480, 832), (832, 480))

_ARCH_13B = Architecture("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16)
_ARCH_14B = Architecture("t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16)
_ARCH_I2V = Architecture("i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
_ARCH_FLF2V = Architecture("flf2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
#: VACE (``Wan2.1-VACE-1.3B`` / ``-14B``): the t2v DiTs plus the hint stream; the 1.3B adds a hint after every
#: other block, the 14B after every fifth (their config.json ``vace_layers``).
_ARCH_VACE_13B = dataclasses.replace(_ARCH_13B, model_type="vace", vace_layers=tuple(range(0, 30, 2)))
_ARCH_VACE_14B = dataclasses.replace(_ARCH_14B, model_type="vace", vace_layers=tuple(range(0, 40, 5)))
#: 480P area of the official sizes (``832*480``): the i2v default shift is 3.0 at this area, 5.0 otherwise.
AREA_480P = 480 * 832

#: The tiny model the project trained (``wanrt/demo``, shipped in the package): the Wan2.1 DiT at dim 128, FFN
#: 512, 4 heads of 32, 4 blocks, reading 128 text tokens of width 64. A whole video in a second on a CPU.
TINY_ARCH = Architecture(
    "t2v", dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_dim=16, text_dim=64, text_len=128
)
#: The random tiny checkpoints (``wanrt make-tiny-checkpoint``, the tests' fixtures): dim 64, 2 blocks, so the
#: test suite stays fast. The ``tiny`` preset accepts both (:attr:`Preset.fixture_archs`).
TINY_FIXTURE_ARCH = Architecture(
    "t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, text_dim=64
)
#: Tiny image-to-video models: the tiny DiT with 36 input channels and a tiny CLIP tower (width 160).
TINY_I2V_ARCH = Architecture(
    "i2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, text_dim=64, image_dim=160
)
TINY_FLF2V_ARCH = Architecture(
    "flf2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, text_dim=64, image_dim=160
)
#: A tiny VACE model: the tiny DiT with a hint after each of its 2 blocks.
TINY_VACE_ARCH = Architecture(
    "vace", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, text_dim=64, vace_layers=(0, 1)
)

PRESETS: Mapping[str, Preset] = {
    p.name: p
    for p in (
        Preset("t2v-1.3b", "t2v", _ARCH_13B, supported_sizes=_SIZES_13B),
        Preset("t2v-14b", "t2v", _ARCH_14B, supported_sizes=_SIZES_14B),
        # i2v: 40 steps; shift 3.0 at 480P (resolved per size by `default_shift`), 5.0 otherwise.
        Preset(
            "i2v-14b-480p", "i2v", _ARCH_I2V, num_inference_steps=40, shift=3.0,
            negative_prompt=I2V_NEGATIVE_PROMPT, supported_sizes=_SIZES_14B,
        ),
        Preset(
            "i2v-14b-720p", "i2v", _ARCH_I2V, height=720, width=1280, num_inference_steps=40, shift=5.0,
            negative_prompt=I2V_NEGATIVE_PROMPT, supported_sizes=_SIZES_14B,
        ),
        # flf2v: "i2v" is not in the task name, so generate.py gives it 50 steps; shift 16.
        Preset(
            "flf2v-14b-720p", "flf2v", _ARCH_FLF2V, height=720, width=1280, shift=16.0,
            negative_prompt=FLF2V_NEGATIVE_PROMPT, supported_sizes=_SIZES_14B,
        ),
        # vace: 50 steps, shift 16 (generate.py: "flf2v" or "vace" in the task), the t2v negative prompt.
        Preset("vace-1.3b", "vace", _ARCH_VACE_13B, shift=16.0, supported_sizes=_SIZES_13B),
        Preset("vace-14b", "vace", _ARCH_VACE_14B, shift=16.0, supported_sizes=_SIZES_14B),
        Preset(
            "tiny", "t2v", TINY_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            supported_sizes=(), fixture_archs=(TINY_FIXTURE_ARCH,),
        ),
        Preset(
            "tiny-i2v", "i2v", TINY_I2V_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            negative_prompt=I2V_NEGATIVE_PROMPT, supported_sizes=(),
        ),
        Preset(
            "tiny-flf2v", "flf2v", TINY_FLF2V_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            shift=16.0, negative_prompt=FLF2V_NEGATIVE_PROMPT, supported_sizes=(),
        ),
        Preset(
            "tiny-vace", "vace", TINY_VACE_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            shift=16.0, supported_sizes=(),
        ),
    )
}

#: Other names accepted by :func:`get_preset`.
ALIASES: Mapping[str, str] = {"flf2v-14b": "flf2v-14b-720p"}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the known presets.
    """
    key = name.lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def default_shift(preset: Preset, height: int, width: int, max_area: int | None = None) -> float:
    """The official sampling shift for this preset at this size.

    ``generate.py``: 5.0; 3.0 for i2v at ``--size`` 832*480 or 480*832; 16 for flf2v. For i2v the official
    ``--size`` is a max area, so when ``max_area`` is given the rule reads it (3.0 at 480*832 = 399360 pixels,
    whatever the image's aspect ratio); otherwise the explicit output size decides. Tiny presets keep their own.
    """
    if preset.task == "i2v" and preset.arch.dim == _ARCH_I2V.dim:
        if max_area is not None:
            return 3.0 if max_area == AREA_480P else 5.0
        return 3.0 if (height, width) in ((480, 832), (832, 480)) else 5.0
    return preset.shift


_RESOLUTION = re.compile(r"(?<![0-9])(480|720)p(?![a-z0-9])", re.IGNORECASE)


def resolution_hint(names: Iterable[str]) -> str | None:
    """``"480p"`` or ``"720p"`` when the given names (folder names, ``_name_or_path`` values) say which
    I2V checkpoint this is, else None (no name says, or the names disagree).

    The I2V-14B-480P and -720P checkpoints have identical shapes and configs: only their names tell them
    apart (``Wan2.1-I2V-14B-720P``, ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``).
    """
    found = {m.group(1) + "p" for n in names for m in _RESOLUTION.finditer(str(n))}
    return found.pop() if len(found) == 1 else None


#: The fields that tell the presets apart, and those :func:`check_against` compares.
_MATCH_FIELDS = ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim")
_CHECK_FIELDS = _MATCH_FIELDS + ("out_dim", "text_dim", "image_dim", "vace_layers")


def _fields(arch: Architecture | Mapping[str, object]) -> Mapping[str, object]:
    return dataclasses.asdict(arch) if isinstance(arch, Architecture) else arch


def _differences(preset: Preset, expected: Architecture, arch: Mapping[str, object]) -> list[str]:
    """``"field: checkpoint X, preset Y"`` for each checked field of ``arch`` that differs from ``expected``."""
    return [f"{f}: checkpoint {arch[f]!r}, preset {getattr(expected, f)!r}" for f in _CHECK_FIELDS
            if f in arch and arch[f] != getattr(expected, f)
            and not (f == "image_dim" and preset.task in ("t2v", "vace"))]


def check_against(preset: Preset, arch: Architecture | Mapping[str, object]) -> None:
    """Check that a checkpoint's DiT architecture is the one ``preset`` expects.

    Args:
        preset: the preset named by the user.
        arch: the checkpoint's architecture (:meth:`Architecture.from_dit`), or a mapping of some of its fields.

    Raises:
        ValueError: a field differs; the message names the field, both values and the presets that
            would match the checkpoint.
    """
    arch = _fields(arch)
    if preset.for_arch(arch) is not None:
        return
    wrong = _differences(preset, preset.arch, arch)
    if wrong:
        matching = [p.name for p in PRESETS.values() if any(
            all(arch.get(f, getattr(a, f)) == getattr(a, f) for f in _MATCH_FIELDS) for a in (p.arch, *p.fixture_archs))]
        hint = f"; the checkpoint matches preset(s) {matching}" if matching else ""
        raise ValueError(f"checkpoint does not match preset {preset.name!r}: " + "; ".join(wrong) + hint)


def preset_for_arch(arch: Architecture | Mapping[str, object], resolution: str | None = None) -> Preset | None:
    """The preset whose architecture matches ``arch`` (for ``Engine.from_pretrained``), or None.

    For i2v the 480P and 720P checkpoints have identical shapes: ``resolution`` ("480p"/"720p", e.g. from
    :func:`resolution_hint`) picks one; without it the 480P preset is returned (its default max area is the
    cheaper one; a 720P checkpoint also makes good 480P videos).
    """
    arch = _fields(arch)
    matches = [q for p in PRESETS.values() for a in (p.arch, *p.fixture_archs)
               if all(arch.get(f) == getattr(a, f) for f in _MATCH_FIELDS)
               for q in ([p] if a is p.arch else [dataclasses.replace(p, arch=a)])]
    if resolution is not None:
        for p in matches:
            if p.name.endswith("-" + resolution.lower()):
                return p
    return matches[0] if matches else None


def generic_preset(arch: Architecture) -> Preset:
    """Sampling defaults for a checkpoint no preset describes: its task's defaults (t2v-1.3b, i2v-14b-480p,
    flf2v-14b-720p), named ``"custom"``, with its own architecture and no supported-size list."""
    base = {"t2v": "t2v-1.3b", "i2v": "i2v-14b-480p", "flf2v": "flf2v-14b-720p",
            "vace": "vace-1.3b"}[arch.model_type]
    return dataclasses.replace(PRESETS[base], name="custom", arch=arch, supported_sizes=())


def choose_preset(preset: Preset | None, ckpt: Path, dit_config, check: bool) -> Preset:
    """The requested preset checked against the checkpoint, or (None) the one its architecture and names say."""
    arch = Architecture.from_dit(dit_config)
    hint = resolution_hint(checkpoint_names(ckpt)) if arch.model_type == "i2v" else None
    if preset is None:
        preset = preset_for_arch(arch, hint) or generic_preset(arch)
        if arch.model_type == "i2v" and hint is None and preset.name.startswith("i2v-14b"):
            log.warning("%s: nothing in the checkpoint's names says 480P or 720P (the two I2V checkpoints have "
                        "identical tensors); using preset %s. Name the preset to choose: "
                        "Engine('i2v-14b-720p', path)", ckpt, preset.name)
        return preset
    if check:
        check_against(preset, arch)
        preset = preset.for_arch(arch) or preset  # a fixture-size tiny checkpoint: the preset at its size
    if hint is not None and preset.task == "i2v" and not preset.name.endswith(hint):
        log.warning("%s: the checkpoint's name says %s but preset %s was requested; its defaults apply",
                    ckpt, hint.upper(), preset.name)
    return preset


def checkpoint_names(ckpt: Path) -> list[str]:
    """Names that may say which I2V checkpoint a folder is (480P or 720P): the folder's own name and the
    ``_name_or_path`` recorded in its configs (official ``config.json``, diffusers ``model_index.json`` and
    ``transformer/config.json``)."""
    import json

    names = [ckpt.resolve().name]
    for rel in ("config.json", "model_index.json", "transformer/config.json"):
        try:
            value = json.loads((ckpt / rel).read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            names.append(value)
    return names
