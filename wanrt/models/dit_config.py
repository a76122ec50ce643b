"""The architecture of a Wan2.1/Wan2.2 DiT (:class:`DiTConfig`: the official ``WanModel`` constructor arguments) and
its two ``config.json`` forms, official and diffusers ``WanTransformer3DModel`` (docs/model-reference.md §1, §3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..presets import TASKS

#: VACE's hint-stream input channels: inactive latents 16 + reactive latents 16 + the 8x8 pixel mask 64 (§VACE).
VACE_IN_DIM = 96

#: Wan2.2 TI2V-5B's latent channels (the 16x16x4 VAE): a text-to-video architecture with 48 in and out channels, which
#: a diffusers config cannot tell from t2v except by them (§Wan2.2 DiT).
TI2V_LATENT_DIM = 48

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16x16 patches + CLS (§5)
ROPE_MAX_POS = 1024  # positions per RoPE axis (§2.8)

# Fields written to the official config.json (§1); the other fields are constructor defaults.
_OFFICIAL_FIELDS = (
    "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type",
    "num_heads", "num_layers", "out_dim", "text_len",
)
# Not in the official config.json; written by to_official_config only when non-default.
_EXTRA_FIELDS = ("patch_size", "text_dim", "qk_norm", "cross_attn_norm", "image_dim")
# In the official config.json of a VACE model (``VaceWanModel``) only.
_VACE_FIELDS = ("vace_layers", "vace_in_dim")


def default_vace_layers(num_layers: int, count: int | None = None) -> tuple[int, ...]:
    """The blocks a VACE model adds hints after: the official default ``range(0, num_layers, 2)``, or, given the
    number of VACE blocks ``count`` (a checkpoint without a config), ``count`` blocks evenly from 0 (the 14B's
    ``[0, 5, ..., 35]`` is 8 of 40). Raises ValueError when ``count`` blocks do not spread evenly."""
    if count is None or count == len(range(0, num_layers, 2)):
        return tuple(range(0, num_layers, 2))
    if count < 1 or num_layers % count:
        raise ValueError(f"cannot place {count} VACE blocks evenly over {num_layers} blocks: give vace_layers")
    return tuple(range(0, num_layers, num_layers // count))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Architecture of a Wan2.1/Wan2.2 DiT (official ``WanModel`` constructor arguments).

    Attributes:
        model_type: ``'t2v'``, ``'i2v'``, ``'flf2v'``, ``'vace'`` or ``'ti2v'``. i2v/flf2v take the
            conditioning latent ``y`` and (with ``image_dim`` set) add the CLIP image projection ``img_emb``
            and the image keys/values of cross-attention; flf2v also adds ``img_emb.emb_pos`` (two images,
            ``2*257`` tokens). vace is t2v plus the hint stream (``vace_patch_embedding`` and ``vace_blocks``,
            official ``VaceWanModel``). ti2v (Wan2.2 TI2V-5B) is a t2v architecture (48 latent channels) that
            is run with per-token timesteps (docs/model-reference.md §Wan2.2 DiT).
        patch_size: ``(pt, ph, pw)`` Conv3d kernel and stride of the patch embedding.
        text_len: Text tokens after zero-padding (512).
        in_dim: Input channels (16 for t2v; 36 = 16 noise + 20 conditioning for i2v/flf2v).
        dim: Hidden width.
        ffn_dim: FFN inner width.
        freq_dim: Width of the sinusoidal timestep embedding (even).
        text_dim: Width of the text-encoder features (4096 for UMT5-XXL).
        out_dim: Output (latent) channels.
        num_heads: Attention heads; ``head_dim = dim // num_heads`` must be even.
        num_layers: Transformer blocks.
        eps: Epsilon of the block/head layer norms and the q/k RMS norms.
        qk_norm: RMS-normalise q and k over the full ``dim``.
        cross_attn_norm: Affine layer norm (``norm3``) before cross-attention.
        image_dim: Width of the CLIP image features (1280), used by i2v/flf2v only; ``None`` for an i2v
            model without CLIP (Wan2.2 I2V-A14B: no ``img_emb``, cross-attention over the text alone).
            flf2v always has CLIP.
        vace_layers: vace only: the main blocks after which a hint is added, one VACE block each, strictly
            increasing from 0 (default the official ``range(0, num_layers, 2)``; the released 1.3B has
            ``[0, 2, ..., 28]``, the 14B ``[0, 5, ..., 35]``). None for the other model types.
        vace_in_dim: vace only: channels of the hint-stream input (96).

    Raises:
        ValueError: from ``__post_init__`` on an inconsistent or unsupported configuration.
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int
    dim: int
    ffn_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int
    num_heads: int
    num_layers: int
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int | None = 1280
    vace_layers: tuple[int, ...] | None = None
    vace_in_dim: int = VACE_IN_DIM

    def __post_init__(self) -> None:
        # JSON gives lists; store a tuple so the config stays hashable.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.model_type not in TASKS:
            raise ValueError(f"model_type must be one of {TASKS}, got {self.model_type!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {self.patch_size}")
        for name in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
                     "out_dim", "num_heads", "image_dim"):
            value = getattr(self, name)
            if name == "image_dim" and value is None:
                if self.model_type != "i2v":
                    raise ValueError(f"image_dim=None (no CLIP) is only for model_type='i2v', got "
                                     f"{self.model_type!r}")
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"num_layers must be an int >= 0, got {self.num_layers!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even ([cos, sin] halves)")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        self._check_vace()

    def _check_vace(self) -> None:
        layers = self.vace_layers
        if self.model_type != "vace":
            if layers is not None:
                raise ValueError(f"vace_layers is only for model_type='vace' (got {self.model_type!r})")
            return
        if layers is None:
            layers = default_vace_layers(self.num_layers) if isinstance(self.num_layers, int) else ()
        if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in layers):
            raise ValueError(f"vace_layers must be a list of block indices, got {layers!r}")
        layers = tuple(layers)
        object.__setattr__(self, "vace_layers", layers)
        if not layers or layers[0] != 0:
            raise ValueError(f"vace_layers must start at block 0 (the first VACE block adds the tokens), got "
                             f"{list(layers)}")
        if any(b <= a for a, b in zip(layers, layers[1:])) or layers[-1] >= self.num_layers:
            raise ValueError(f"vace_layers must be strictly increasing block indices below num_layers="
                             f"{self.num_layers}, got {list(layers)}")
        if not isinstance(self.vace_in_dim, int) or isinstance(self.vace_in_dim, bool) or self.vace_in_dim < 1:
            raise ValueError(f"vace_in_dim must be a positive int, got {self.vace_in_dim!r}")

    @property
    def has_vace(self) -> bool:
        """True for VACE models (the hint stream: ``vace_patch_embedding``, ``vace_blocks``)."""
        return self.model_type == "vace"

    @property
    def head_dim(self) -> int:
        """``dim // num_heads`` (128 in every released Wan2.1 model)."""
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """True for i2v and flf2v (CLIP features and a conditioning latent ``y``)."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def has_clip(self) -> bool:
        """True when the model expects CLIP features ``clip_fea`` (i2v/flf2v with ``image_dim`` set: ``img_emb``
        and the image keys/values of cross-attention). False for Wan2.2's CLIP-less i2v."""
        return self.has_image_input and self.image_dim is not None

    @property
    def image_tokens(self) -> int:
        """CLIP tokens expected in ``clip_fea``: 257 (i2v), 514 (flf2v), 0 (t2v, ti2v, vace, i2v without CLIP)."""
        if not self.has_clip:
            return 0
        return {"i2v": CLIP_TOKENS, "flf2v": 2 * CLIP_TOKENS}[self.model_type]

    @classmethod
    def from_official_config(cls, config: Mapping[str, Any]) -> DiTConfig:
        """Build from an official ``config.json`` dict (§1).

        Reads dim, eps, ffn_dim, freq_dim, in_dim, model_type, num_heads, num_layers,
        out_dim, text_len; the fields the official code keeps out of config.json
        (patch_size, text_dim, qk_norm, cross_attn_norm) take the constructor defaults unless
        present (:meth:`to_official_config` writes them when non-default). Keys starting with
        ``_`` and unknown keys (e.g. ``window_size``) are ignored. ``image_dim: null`` (written by
        :meth:`to_official_config` for an i2v model without CLIP) gives ``image_dim=None``; the released
        Wan2.2 I2V-A14B config.json does not say it (its form is Wan2.1 i2v's): the loaders tell it from the
        weights (no ``img_emb.*`` keys, :func:`wanrt.checkpoints.loaders.reconcile_clip`).

        Raises:
            ValueError: if a required field is missing or the values are invalid.
        """
        required = ("dim", "ffn_dim", "in_dim", "num_heads", "num_layers", "out_dim")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"official DiT config is missing {missing}")
        kwargs = {k: config[k] for k in _OFFICIAL_FIELDS + _EXTRA_FIELDS if k in config}
        if kwargs.get("model_type") == "vace":
            kwargs.update({k: config[k] for k in _VACE_FIELDS if config.get(k) is not None})
        return cls(**kwargs)

    def to_official_config(self) -> dict[str, Any]:
        """The official ``config.json`` dict (``_class_name`` 'WanModel' plus the §1 fields).

        Fields that the official config.json never holds (patch_size, text_dim, qk_norm,
        cross_attn_norm, image_dim) are added only when they differ from the defaults, so
        tiny test configs round-trip through :meth:`from_official_config` (an i2v model without CLIP
        writes ``image_dim: null``).
        """
        out: dict[str, Any] = {"_class_name": "VaceWanModel" if self.has_vace else "WanModel"}
        out.update({k: getattr(self, k) for k in _OFFICIAL_FIELDS})
        if self.has_vace:
            out.update(vace_layers=list(self.vace_layers), vace_in_dim=self.vace_in_dim)
        for f in dataclasses.fields(self):
            if f.name in _EXTRA_FIELDS and getattr(self, f.name) != f.default:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> DiTConfig:
        """Build from a diffusers ``WanTransformer3DModel`` ``config.json`` dict (§3).

        ``image_dim`` + ``added_kv_proj_dim`` select i2v, and ``pos_embed_seq_len`` (514)
        flf2v; ``vace_layers`` (``WanVACETransformer3DModel``) vace. Without image fields, more input than
        output channels (Wan2.2 I2V-A14B: 36 in, 16 out) is an i2v model without CLIP (``image_dim=None``),
        and 48 input and output channels is Wan2.2 TI2V-5B (``'ti2v'``: diffusers has no field for it).
        Missing fields take the diffusers constructor defaults.

        Raises:
            ValueError: for configs this model cannot represent (qk_norm other than
                'rms_norm_across_heads'/None, inconsistent image fields, ...).
        """
        heads = config.get("num_attention_heads", 40)
        dim = heads * config.get("attention_head_dim", 128)
        qk = config.get("qk_norm", "rms_norm_across_heads")
        if qk not in ("rms_norm_across_heads", None):
            raise ValueError(f"unsupported diffusers qk_norm={qk!r}")
        # diffusers builds the q/k RMS norms whatever qk_norm says, so qk_norm is always True.
        image_dim = config.get("image_dim")
        added_kv = config.get("added_kv_proj_dim")
        pos_len = config.get("pos_embed_seq_len")
        vace = config.get("_class_name") == "WanVACETransformer3DModel" or "vace_layers" in config
        if vace and (image_dim is not None or added_kv is not None):
            raise ValueError("a diffusers VACE config with image input is not a Wan2.1 VACE model")
        if vace:
            model_type = "vace"
        elif image_dim is None and added_kv is None:
            if pos_len is not None:
                raise ValueError("pos_embed_seq_len is set but the config has no image input")
            channels_in = config.get("in_channels", 16)
            channels_out = config.get("out_channels") or channels_in
            if channels_in > channels_out:  # the conditioning latent y concatenated: Wan2.2 i2v, no CLIP
                model_type = "i2v"
            elif channels_in == channels_out == TI2V_LATENT_DIM:
                model_type = "ti2v"
            else:
                model_type = "t2v"
        elif image_dim is not None and added_kv == dim:
            if pos_len not in (None, 2 * CLIP_TOKENS):
                raise ValueError(f"pos_embed_seq_len must be {2 * CLIP_TOKENS}, got {pos_len}")
            model_type = "flf2v" if pos_len else "i2v"
        else:
            raise ValueError(
                "diffusers config needs both image_dim and added_kv_proj_dim == inner dim "
                f"({dim}) for i2v/flf2v; got image_dim={image_dim}, added_kv_proj_dim={added_kv}"
            )
        in_dim = config.get("in_channels", 16)
        return cls(
            model_type=model_type,
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            in_dim=in_dim,
            dim=dim,
            ffn_dim=config.get("ffn_dim", 13824),
            freq_dim=config.get("freq_dim", 256),
            text_dim=config.get("text_dim", 4096),
            out_dim=config.get("out_channels") or in_dim,
            num_heads=heads,
            num_layers=config.get("num_layers", 40),
            eps=config.get("eps", 1e-6),
            qk_norm=True,
            cross_attn_norm=config.get("cross_attn_norm", True),
            image_dim=image_dim if image_dim is not None else None if model_type == "i2v" else 1280,
            vace_layers=tuple(config.get("vace_layers", (0, 5, 10, 15, 20, 25, 30, 35))) if vace else None,
            vace_in_dim=config.get("vace_in_channels", VACE_IN_DIM),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        """Constructor kwargs of diffusers ``WanTransformer3DModel`` (``WanVACETransformer3DModel`` for vace) for
        this architecture.

        Raises:
            ValueError: if ``qk_norm`` is False (diffusers always has the q/k norms) or, for
                i2v/flf2v, ``text_len`` is not 512 (diffusers hard-codes 512 text tokens when
                it splits image and text context).
        """
        if not self.qk_norm:
            raise ValueError("diffusers WanTransformer3DModel cannot represent qk_norm=False")
        if self.has_clip and self.text_len != 512:
            raise ValueError("diffusers supports image conditioning only with text_len=512")
        image = self.has_clip  # the CLIP fields; a CLIP-less i2v is told by its channels
        vace = {"vace_layers": list(self.vace_layers), "vace_in_channels": self.vace_in_dim} if self.has_vace else {}
        return vace | {
            "patch_size": tuple(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": self.image_dim if image else None,
            "added_kv_proj_dim": self.dim if image else None,
            "rope_max_seq_len": ROPE_MAX_POS,
            "pos_embed_seq_len": 2 * CLIP_TOKENS if self.model_type == "flf2v" else None,
        }
