"""Model presets: the architecture each Wan2.1 checkpoint should have and its official sampling defaults.

A preset never builds a model: the architecture is always read from the checkpoint's own config
(official ``config.json`` or the diffusers configs). The preset supplies sampling defaults and is
checked against the checkpoint when both are given (:func:`check_against`).

Sources: ``wan/configs/*.py`` and ``generate.py::_validate_args`` of the official Wan2.1 code
(docs: wan21-reference.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

#: The official default negative prompt (``shared_config.sample_neg_prompt``).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
#: i2v prepends this to the negative prompt; flf2v prepends "镜头切换，" to the i2v one.
I2V_NEGATIVE_PROMPT = "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT

TASKS = ("t2v", "i2v", "flf2v")


@dataclass(frozen=True)
class Architecture:
    """The DiT hyper-parameters a preset expects; compared with the checkpoint's config.

    Attributes:
        model_type: "t2v", "i2v" or "flf2v".
        dim: hidden size of the DiT residual stream.
        ffn_dim: hidden size of the feed-forward network.
        num_heads: attention heads (head_dim = dim / num_heads).
        num_layers: number of DiT blocks.
        in_dim: input latent channels (16 for t2v; 36 = 16 noise + 4 mask + 16 condition for i2v/flf2v).
        out_dim: output channels (16).
        text_dim: width of the text-encoder output (4096 for UMT5-XXL).
        text_len: number of text tokens the context is zero-padded to (512).
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

    def __post_init__(self) -> None:
        if self.model_type not in TASKS:
            raise ValueError(f"model_type must be one of {TASKS}, got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")


@dataclass(frozen=True)
class Preset:
    """One Wan2.1 model: expected architecture and official sampling defaults.

    Attributes:
        name: preset name used by ``Engine(name)`` and ``wanrt generate --model``.
        task: "t2v", "i2v" or "flf2v".
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

    def __post_init__(self) -> None:
        if self.task != self.arch.model_type:
            raise ValueError(f"preset {self.name}: task {self.task} != arch.model_type {self.arch.model_type}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"preset {self.name}: default size must be multiples of 16")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"preset {self.name}: default num_frames must be 4k+1")


_SIZES_14B = ((720, 1280), (1280, 720), (480, 832), (832, 480))
_SIZES_13B = ((480, 832), (832, 480))

_ARCH_13B = Architecture("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16)
_ARCH_14B = Architecture("t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16)
_ARCH_I2V = Architecture("i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
_ARCH_FLF2V = Architecture("flf2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)

#: The tiny model: random weights, real architecture family, small enough for a whole video in seconds
#: on a CPU. Used by the tests, the README quick start and ``wanrt make-tiny-checkpoint``.
TINY_ARCH = Architecture(
    "t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, text_dim=64
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
            "flf2v-14b", "flf2v", _ARCH_FLF2V, height=720, width=1280, shift=16.0,
            negative_prompt=FLF2V_NEGATIVE_PROMPT, supported_sizes=_SIZES_14B,
        ),
        Preset(
            "tiny", "t2v", TINY_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            supported_sizes=(),
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the known presets.
    """
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def default_shift(preset: Preset, height: int, width: int) -> float:
    """The official sampling shift for this preset at this size.

    ``generate.py``: 5.0; 3.0 for i2v at 832*480 or 480*832; 16 for flf2v.
    """
    if preset.task == "i2v":
        return 3.0 if (height, width) in ((480, 832), (832, 480)) else 5.0
    return preset.shift


def check_against(preset: Preset, arch: Mapping[str, object]) -> None:
    """Check that a checkpoint's DiT architecture is the one ``preset`` expects.

    Args:
        preset: the preset named by the user.
        arch: the checkpoint's values, keys among ``Architecture``'s field names.

    Raises:
        ValueError: a field differs; the message names the field, both values and the presets that
            would match the checkpoint.
    """
    wrong = []
    for f in ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim"):
        if f in arch and arch[f] != getattr(preset.arch, f):
            wrong.append(f"{f}: checkpoint {arch[f]!r}, preset {getattr(preset.arch, f)!r}")
    if wrong:
        matching = [
            p.name for p in PRESETS.values()
            if all(arch.get(f, getattr(p.arch, f)) == getattr(p.arch, f)
                   for f in ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim"))
        ]
        hint = f"; the checkpoint matches preset(s) {matching}" if matching else ""
        raise ValueError(f"checkpoint does not match preset {preset.name!r}: " + "; ".join(wrong) + hint)


def preset_for_arch(arch: Mapping[str, object]) -> Preset | None:
    """The preset whose architecture matches ``arch`` (for ``Engine.from_pretrained``), or None.

    For i2v the 480P and 720P checkpoints have identical shapes; the 480P preset is returned and
    the shift is then resolved per size by :func:`default_shift`.
    """
    for p in PRESETS.values():
        if all(arch.get(f) == getattr(p.arch, f)
               for f in ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim")):
            return p
    return None
