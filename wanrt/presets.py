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

#: The VAEs a preset can use.
VAES = ("wan2.1", "wan2.2")

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
        image_dim: width of the CLIP image features the DiT projects (1280 for ViT-H/14; i2v/flf2v only); None for
            Wan2.2's I2V-A14B, which conditions by channel concatenation alone (no CLIP).
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
    image_dim: int | None = 1280
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
        vae: "wan2.1" (16 latent channels, 8x spatial) or "wan2.2" (TI2V-5B's: 48 channels, 16x spatial).
        boundary: Wan2.2 A14B (mixture of two experts): the high-noise expert runs while the timestep is
            ``>= boundary * 1000``, then the low-noise one (official ``config.boundary``; diffusers
            ``boundary_ratio``); None for one DiT.
        guidance_scale_2: A14B: the low-noise expert's CFG scale (``guidance_scale`` is the high-noise one's;
            diffusers' names; the official config's tuple is ``(low, high)``); None for one DiT.

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
    vae: str = "wan2.1"
    boundary: float | None = None
    guidance_scale_2: float | None = None

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
        if self.vae not in VAES:
            raise ValueError(f"preset {self.name}: vae must be one of {VAES}, got {self.vae!r}")
        if self.height % self.size_multiple or self.width % self.size_multiple:
            raise ValueError(f"preset {self.name}: default size must be multiples of {self.size_multiple}")
        if (self.boundary is None) != (self.guidance_scale_2 is None):
            raise ValueError(f"preset {self.name}: a mixture of experts needs both boundary and guidance_scale_2")
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            raise ValueError(f"preset {self.name}: boundary must be in (0, 1), got {self.boundary}")

    @property
    def is_moe(self) -> bool:
        """Wan2.2 A14B: two DiTs (high-noise and low-noise experts) switched at :attr:`boundary`."""
        return self.boundary is not None

    @property
    def image_conditioned(self) -> bool:
        """Whether the task conditions on an image by a latent ``y`` (i2v, flf2v)."""
        return self.task in ("i2v", "flf2v")

    @property
    def uses_clip(self) -> bool:
        """Whether the DiT reads CLIP image features (Wan2.1 i2v/flf2v; not Wan2.2's I2V-A14B)."""
        return self.image_conditioned and self.arch.image_dim is not None

    @property
    def latent_channels(self) -> int:
        """Latent channels of the VAE (16 for the Wan2.1 VAE, 48 for Wan2.2's)."""
        return 48 if self.vae == "wan2.2" else 16

    @property
    def vae_stride(self) -> tuple[int, int]:
        """``(temporal, spatial)`` compression of the VAE: (4, 8) for Wan2.1's, (4, 16) for Wan2.2's."""
        return (4, 16) if self.vae == "wan2.2" else (4, 8)

    @property
    def size_multiple(self) -> int:
        """What height and width must be multiples of: the VAE's spatial stride times the patch (2): 16, or 32
        for the Wan2.2 VAE."""
        return self.vae_stride[1] * 2

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
#: Wan2.2 (``wan/configs/wan_ti2v_5B.py``, ``wan_t2v_A14B.py``, ``wan_i2v_A14B.py``): TI2V-5B reads 48 latent
#: channels of the Wan2.2 VAE; each A14B expert is a Wan2.1-14B-shaped DiT, the I2V one without CLIP.
_ARCH_TI2V_5B = Architecture("ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
_ARCH_I2V_A14B = dataclasses.replace(_ARCH_I2V, image_dim=None)
_SIZES_TI2V = ((704, 1280), (1280, 704), (480, 832), (832, 480))
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
#: Tiny Wan2.2 models: TI2V with the Wan2.2 VAE's 48 channels; the A14B experts at the tiny fixture size (the
#: I2V one with 36 input channels and no CLIP).
TINY_TI2V_ARCH = Architecture(
    "ti2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=48, out_dim=48, text_dim=64
)
TINY_I2V_A14B_ARCH = Architecture(
    "i2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, text_dim=64, image_dim=None
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
        # Wan2.2. TI2V-5B: 121 frames at 24 fps, 50 steps, CFG 5, shift 5, the Wan2.2 VAE; text-to-video, or
        # image-to-video when given an image (its first latent frame is the image's, at timestep 0).
        Preset(
            "ti2v-5b", "ti2v", _ARCH_TI2V_5B, height=704, width=1280, num_frames=121, shift=5.0, fps=24,
            supported_sizes=_SIZES_TI2V, vae="wan2.2",
        ),
        # A14B: two experts; official guidance (low, high) = (3.0, 4.0) for T2V, (3.5, 3.5) for I2V; 40 steps.
        Preset(
            "t2v-a14b", "t2v", _ARCH_14B, height=720, width=1280, num_inference_steps=40, guidance_scale=4.0,
            shift=12.0, supported_sizes=_SIZES_14B, boundary=0.875, guidance_scale_2=3.0,
        ),
        Preset(
            "i2v-a14b", "i2v", _ARCH_I2V_A14B, height=720, width=1280, num_inference_steps=40, guidance_scale=3.5,
            shift=5.0, supported_sizes=_SIZES_14B, boundary=0.900, guidance_scale_2=3.5,
        ),
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
        Preset(
            "tiny-ti2v", "ti2v", TINY_TI2V_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4, fps=24,
            supported_sizes=(), vae="wan2.2",
        ),
        Preset(
            "tiny-a14b", "t2v", TINY_FIXTURE_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            guidance_scale=4.0, shift=12.0, supported_sizes=(), boundary=0.875, guidance_scale_2=3.0,
        ),
        Preset(
            "tiny-i2v-a14b", "i2v", TINY_I2V_A14B_ARCH, height=64, width=96, num_frames=9, num_inference_steps=4,
            guidance_scale=3.5, shift=5.0, supported_sizes=(), boundary=0.900, guidance_scale_2=3.5,
        ),
    )
}

#: Other names accepted by :func:`get_preset`.
ALIASES: Mapping[str, str] = {"flf2v-14b": "flf2v-14b-720p", "ti2v": "ti2v-5b"}


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
    if preset.task == "i2v" and preset.arch.dim == _ARCH_I2V.dim and not preset.is_moe:  # Wan2.1 only
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
            and not (f == "image_dim" and preset.task in ("t2v", "vace", "ti2v"))]


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
        matching = [p.name for p in PRESETS.values() if p.is_moe == preset.is_moe and any(
            all(arch.get(f, getattr(a, f)) == getattr(a, f) for f in _MATCH_FIELDS) for a in (p.arch, *p.fixture_archs))]
        hint = f"; the checkpoint matches preset(s) {matching}" if matching else ""
        raise ValueError(f"checkpoint does not match preset {preset.name!r}: " + "; ".join(wrong) + hint)


def preset_for_arch(arch: Architecture | Mapping[str, object], resolution: str | None = None, *,
                    moe: bool = False) -> Preset | None:
    """The preset whose architecture matches ``arch`` (for ``Engine.from_pretrained``), or None.

    ``moe``: the checkpoint holds two experts (Wan2.2 A14B): only the mixture-of-experts presets match (their
    experts have the shapes of the Wan2.1 14B DiTs); without it only the single-DiT ones.

    For i2v the 480P and 720P checkpoints have identical shapes: ``resolution`` ("480p"/"720p", e.g. from
    :func:`resolution_hint`) picks one; without it the 480P preset is returned (its default max area is the
    cheaper one; a 720P checkpoint also makes good 480P videos).
    """
    arch = _fields(arch)
    matches = [q for p in PRESETS.values() if p.is_moe == moe for a in (p.arch, *p.fixture_archs)
               if all(arch.get(f) == getattr(a, f) for f in _MATCH_FIELDS)
               and (arch.get("image_dim", 0) is None) == (a.image_dim is None)
               for q in ([p] if a is p.arch else [dataclasses.replace(p, arch=a)])]
    if resolution is not None:
        for p in matches:
            if p.name.endswith("-" + resolution.lower()):
                return p
    return matches[0] if matches else None


def generic_preset(arch: Architecture, *, moe: bool = False) -> Preset:
    """Sampling defaults for a checkpoint no preset describes: its task's defaults (t2v-1.3b, i2v-14b-480p,
    flf2v-14b-720p, vace-1.3b, ti2v-5b; t2v-a14b / i2v-a14b for two experts), named ``"custom"``, with its own
    architecture and no supported-size list."""
    if moe:
        base = {"t2v": "t2v-a14b", "i2v": "i2v-a14b"}.get(arch.model_type)
        if base is None:
            raise ValueError(f"a checkpoint of two {arch.model_type} experts is not a Wan2.2 A14B model")
    else:
        base = {"t2v": "t2v-1.3b", "i2v": "i2v-14b-480p" if arch.image_dim is not None else "i2v-a14b",
                "flf2v": "flf2v-14b-720p", "vace": "vace-1.3b", "ti2v": "ti2v-5b"}[arch.model_type]
    return dataclasses.replace(PRESETS[base], name="custom", arch=arch, supported_sizes=())


def choose_preset(preset: Preset | None, ckpt: Path, dit_config, check: bool, *, moe: bool = False) -> Preset:
    """The requested preset checked against the checkpoint, or (None) the one its architecture and names say.
    ``moe``: the checkpoint holds two experts (Wan2.2 A14B).

    Raises:
        ValueError: the checkpoint does not match the preset (its architecture, or two experts against one DiT).
    """
    arch = Architecture.from_dit(dit_config)
    if preset is not None and preset.is_moe != moe:
        if moe:
            raise ValueError(f"{ckpt} holds two experts (a Wan2.2 A14B checkpoint) but preset {preset.name!r} runs "
                             f"one DiT; use preset {'i2v-a14b' if arch.model_type == 'i2v' else 't2v-a14b'}")
        raise ValueError(f"preset {preset.name!r} runs two experts (Wan2.2 A14B) but {ckpt} holds one DiT: expected "
                         "high_noise_model/ and low_noise_model/ (official) or transformer/ and transformer_2/ "
                         "(diffusers)")
    hint = resolution_hint(checkpoint_names(ckpt)) if arch.model_type == "i2v" and not moe else None
    if preset is None:
        preset = preset_for_arch(arch, hint, moe=moe) or generic_preset(arch, moe=moe)
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
