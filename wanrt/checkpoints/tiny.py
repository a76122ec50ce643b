"""Write random-initialized Wan2.1 checkpoints in the real layouts (``wanrt make-tiny-checkpoint``).

Model weights can never be downloaded in CI, so the real loading code is exercised on checkpoints the
project writes itself: the same files, key names, dtypes and configs as the official and diffusers
releases, with random weights and a small SentencePiece tokenizer trained on the spot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..presets import PRESETS, Preset, get_preset
from .layout import (
    OFFICIAL_CLIP,
    OFFICIAL_DIT_WEIGHTS,
    OFFICIAL_EXPERTS,
    OFFICIAL_T5,
    OFFICIAL_TOKENIZER,
    OFFICIAL_VAE,
    OFFICIAL_VAE22,
)

LAYOUTS = ("official", "diffusers")
TINY_VOCAB = 384


def randomize_(module: torch.nn.Module, seed: int = 0, *, std_scale: float = 1.0) -> torch.nn.Module:
    """Fill every parameter with seeded random values that keep activations O(1).

    Weights of rank ≥ 2 get ``N(0, 1/fan_in)``; 1-D norm weights and VAE gammas ``1 + N(0, 0.1²)``;
    biases ``N(0, 0.02²)``; modulation tables ``N(0, 0.1²)``; the token embedding ``N(0, 1)``.
    Deterministic for a given seed and module structure. Returns the module.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "modulation" in name or "scale_shift" in name or "emb_pos" in name:
                v = torch.randn(p.shape, generator=g) * 0.1
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=g) * 0.02
            elif leaf == "gamma" or p.ndim == 1 or (p.ndim > 1 and p.shape[1:].numel() == 1 and "norm" in name):
                v = 1.0 + torch.randn(p.shape, generator=g) * 0.1
            elif "token_embedding" in name or "embed_tokens" in name or name.endswith("shared.weight"):
                v = torch.randn(p.shape, generator=g)
            elif "pos_embedding" in name or "relative_attention_bias" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            else:
                fan_in = p.shape[1:].numel() if p.ndim > 1 else p.shape[0]
                v = torch.randn(p.shape, generator=g) * (std_scale / math.sqrt(max(1, fan_in)))
            p.copy_(v.to(p.dtype))
    return module


def tiny_t5_config(text_dim: int, vocab: int = TINY_VOCAB):
    """A small UMT5 encoder config whose output width is ``text_dim`` (the DiT's text_dim)."""
    from ..models.t5 import UMT5Config

    heads = 4 if text_dim <= 256 else 32
    return UMT5Config(vocab_size=vocab, dim=text_dim, dim_attn=text_dim, dim_ffn=2 * text_dim,
                      num_heads=heads, num_layers=2)


def tiny_vae_config(preset: Preset, base_dim: int | None = None):
    """The VAE config written for ``preset``: the real one for full-size presets, base_dim 8 for tiny;
    ``base_dim`` overrides either."""
    from ..models.vae import VAEConfig

    if preset.vae == "wan2.2":  # TI2V-5B's VAE: the released one (160 / 256), or a small one for the tiny presets
        if base_dim is not None:
            return VAEConfig.wan22(base_dim=base_dim, decoder_base_dim=2 * base_dim)
        return tiny_vae22_config() if is_tiny(preset) else VAEConfig.wan22()
    if base_dim is not None:
        return VAEConfig(base_dim=base_dim)
    return VAEConfig(base_dim=8) if is_tiny(preset) else VAEConfig()


def tiny_vae22_config(base_dim: int = 8, decoder_base_dim: int = 16):
    """A small Wan2.2-layout VAE config (residual stages, 2x2 patchify, 48 latent channels, the released mean/std
    and stage pattern) for tests and tiny checkpoints: the released ``Wan2.2_VAE.pth`` is ``base_dim=160``,
    ``decoder_base_dim=256`` (:meth:`VAEConfig.wan22`)."""
    from ..models.vae import VAEConfig

    return VAEConfig.wan22(base_dim=base_dim, decoder_base_dim=decoder_base_dim)


def is_tiny(preset: Preset) -> bool:
    """True for the tiny presets (``tiny``, ``tiny-i2v``, ``tiny-flf2v``, ``tiny-vace``)."""
    return preset.name == "tiny" or preset.name.startswith("tiny-")


def tiny_clip_config(preset: Preset):
    """The CLIP vision config written for an i2v/flf2v ``preset``: ViT-H/14 for full-size presets; for the tiny
    ones width ``image_dim`` (160: 2 heads of 80, as ViT-H's head width), 3 blocks, still 224 px / patch 14, so
    the DiT sees the real 257 tokens per image."""
    from ..models.clip import CLIPVisionConfig

    if not is_tiny(preset):
        return CLIPVisionConfig()
    d = preset.arch.image_dim
    return CLIPVisionConfig(dim=d, mlp_dim=4 * d, num_heads=max(1, d // 80), num_layers=3)


def official_clip_state(
    cfg, seed: int = 0, *, projection_dim: int = 32, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random FULL official-layout CLIP state dict, like ``models_clip_open-clip-...-vit-huge-14.pth``.

    Holds all ``cfg.num_layers`` blocks (the last one included), ``visual.post_norm.*`` and
    ``visual.head`` ``[dim, projection_dim]``, plus two small ``textual.*`` tensors and ``log_scale``
    standing for the text tower, so that loaders must drop what Wan does not use. Values keep
    activations O(1) (:func:`randomize_`); deterministic for a seed.

    Args:
        cfg: A :class:`~wanrt.models.clip.CLIPVisionConfig`.
        seed: Seed of the random values.
        projection_dim: Columns of ``visual.head`` (1024 in the real file).
        dtype: Dtype of every tensor (the real file is float16).

    Returns:
        ``key -> tensor``, contiguous CPU tensors not sharing storage (ready for ``torch.save``).
    """
    import dataclasses

    from ..models.clip import CLIPVisionTower
    from .keymap_clip import OFFICIAL_PREFIX

    full = CLIPVisionTower(dataclasses.replace(cfg, num_layers=cfg.num_layers + 1))  # builds num_layers blocks
    randomize_(full, seed)
    g = torch.Generator().manual_seed(seed + 1)
    state = {OFFICIAL_PREFIX + k: v.detach().clone() for k, v in full.state_dict().items()}
    state["visual.post_norm.weight"] = 1.0 + 0.1 * torch.randn(cfg.dim, generator=g)
    state["visual.post_norm.bias"] = 0.02 * torch.randn(cfg.dim, generator=g)
    state["visual.head"] = torch.randn(cfg.dim, projection_dim, generator=g) / math.sqrt(cfg.dim)
    state["textual.token_embedding.weight"] = torch.randn(16, 8, generator=g)
    state["textual.head.0.weight"] = torch.randn(8, 8, generator=g) / math.sqrt(8)
    state["log_scale"] = torch.tensor(math.log(1 / 0.07))
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def dit_config_for(preset: Preset):
    """The ``DiTConfig`` of the architecture ``preset`` expects."""
    from ..models.dit import DiTConfig

    a = preset.arch
    return DiTConfig(model_type=a.model_type, in_dim=a.in_dim, dim=a.dim, ffn_dim=a.ffn_dim, out_dim=a.out_dim,
                     num_heads=a.num_heads, num_layers=a.num_layers, text_dim=a.text_dim, text_len=a.text_len,
                     image_dim=a.image_dim, vace_layers=a.vace_layers)


def _save_safetensors_sharded(state: dict[str, torch.Tensor], folder: Path, base: str, shards: int,
                              metadata: dict | None = None) -> None:
    """Save ``state`` as ``base`` (one file) or as ``shards`` files with a ``base.index.json``."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(folder / base), metadata=metadata)
        return
    stem = base[: -len(".safetensors")]
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = keys[i * per:(i + 1) * per]
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name), metadata=metadata)
        for k in part:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    (folder / (base + ".index.json")).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def write_official_dit(out: Path, dit, shards: int = 1) -> None:
    """Write ``dit`` (a :class:`~wanrt.models.dit.WanDiT`) into ``out`` in the official layout: ``config.json``
    (``WanModel`` keys) and ``diffusion_pytorch_model.safetensors`` (or ``shards`` shards with an index)."""
    cfg = dict(dit.config.to_official_config())
    cfg.setdefault("_class_name", "WanModel")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_safetensors_sharded(dit.state_dict(), out, OFFICIAL_DIT_WEIGHTS, shards)


def write_checkpoint(
    out_dir: str | os.PathLike,
    *,
    layout: str = "official",
    preset: str | Preset = "tiny",
    seed: int = 0,
    shards: int = 1,
    vae_base_dim: int | None = None,
) -> Path:
    """Write a random-initialized Wan2.1 checkpoint in a real layout.

    Args:
        out_dir: destination folder (created; must not hold a checkpoint already).
        layout: "official" (config.json, diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth,
            models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/; i2v/flf2v add
            models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth; vace's config.json is a ``VaceWanModel``'s) or
            "diffusers" (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/; i2v/flf2v add
            image_encoder/ and image_processor/, as ``WanImageToVideoPipeline``; vace is a ``WanVACEPipeline``
            with a ``WanVACETransformer3DModel``).
        preset: "tiny", "tiny-i2v", "tiny-flf2v", "tiny-vace" (seconds on a CPU; "tiny" at its fixture size, dim 64 x 2
            blocks, :data:`~wanrt.presets.TINY_FIXTURE_ARCH`; a ``Preset`` that is not the registered one, e.g.
            without ``fixture_archs``, writes its own ``arch``) or a full-size preset such as "t2v-1.3b" (the real DiT and VAE
            architecture for benchmarks; the text encoder is a 2-layer UMT5 of the real width, since the
            XXL encoder would be 11 GB of random numbers).
        seed: seed of the random weights.
        shards: split the DiT weights into this many safetensors shards with an index.
        vae_base_dim: the VAE's base width (default: 8 for the tiny presets, 96 otherwise).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: unknown layout or preset, shards < 1, or ``out_dir`` is a non-empty folder.
    """
    from ..models.dit import WanDiT
    from ..models.t5 import UMT5Encoder
    from ..models.vae import WanVAE
    from .tiny_tokenizer import build_tiny_tokenizer

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    if p.fixture_archs and p == PRESETS.get(p.name):  # "tiny": the random fixture size, not the trained model's
        p = dataclasses.replace(p, arch=p.fixture_archs[0])
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)

    dit_cfg = dit_config_for(p)
    dit = randomize_(WanDiT(dit_cfg), seed)
    dit_2 = randomize_(WanDiT(dit_cfg), seed + 10) if p.is_moe else None  # A14B: the low-noise expert
    vae_cfg = tiny_vae_config(p, vae_base_dim)
    vae = randomize_(WanVAE(vae_cfg), seed + 1)
    t5_cfg = tiny_t5_config(p.arch.text_dim)
    t5 = randomize_(UMT5Encoder(t5_cfg), seed + 2).to(torch.bfloat16)
    clip_state = clip_cfg = None
    if p.uses_clip:
        clip_cfg = tiny_clip_config(p)
        # fp16 values (the official file's dtype); the diffusers image_encoder/ holds the same values in fp32
        clip_state = {k: v.half().float() if v.is_floating_point() else v
                      for k, v in official_clip_state(clip_cfg, seed=seed + 3).items()}

    if layout == "official":
        if dit_2 is not None:  # A14B: high_noise_model/ and low_noise_model/, no config.json at the top
            for folder, expert in zip(OFFICIAL_EXPERTS, (dit, dit_2)):
                (out / folder).mkdir()
                write_official_dit(out / folder, expert, shards)
        else:
            write_official_dit(out, dit, shards)
        del dit, dit_2
        torch.save(vae.state_dict(), out / (OFFICIAL_VAE22 if p.vae == "wan2.2" else OFFICIAL_VAE))
        torch.save(t5.state_dict(), out / OFFICIAL_T5)
        build_tiny_tokenizer(out / OFFICIAL_TOKENIZER, vocab_size=t5_cfg.vocab_size)
        if clip_state is not None:  # the official CLIP file is fp16 (the text tower's tokenizer is not needed)
            torch.save({k: v.half() if v.is_floating_point() else v for k, v in clip_state.items()},
                       out / OFFICIAL_CLIP)
        return out

    from .keymap_dit import dit_from_official
    from .keymap_t5 import t5_from_official
    from .keymap_vae import vae_key_mapper

    diffusers_version = _diffusers_version()
    vace = p.task == "vace"
    image_pipeline = p.image_conditioned  # WanImageToVideoPipeline (Wan2.2's I2V-A14B without CLIP too)
    model_index = {
        "_class_name": "WanVACEPipeline" if vace else "WanImageToVideoPipeline" if image_pipeline else "WanPipeline",
        "_diffusers_version": diffusers_version,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanVACETransformer3DModel" if vace else "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if clip_state is not None:
        model_index.update(image_encoder=["transformers", "CLIPVisionModel"],
                           image_processor=["transformers", "CLIPImageProcessor"])
        _write_image_encoder(out, clip_state, clip_cfg)
    elif image_pipeline:  # diffusers writes absent optional parts as [null, null]
        model_index.update(image_encoder=[None, None], image_processor=[None, None])
    if dit_2 is not None:  # A14B: transformer/ is the high-noise expert, transformer_2/ the low-noise one
        model_index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=p.boundary)
    if p.task == "ti2v":  # Wan2.2 TI2V: per-token timesteps (diffusers' expand_timesteps)
        model_index["expand_timesteps"] = True
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2))
    for sub in ("transformer", "vae", "text_encoder", "scheduler"):
        (out / sub).mkdir()
    tcfg = {"_class_name": "WanVACETransformer3DModel" if vace else "WanTransformer3DModel",
            "_diffusers_version": diffusers_version,
            **dit_cfg.to_diffusers_config()}
    (out / "transformer" / "config.json").write_text(json.dumps(tcfg, indent=2))
    _save_safetensors_sharded({dit_from_official(k): v for k, v in dit.state_dict().items()},
                              out / "transformer", "diffusion_pytorch_model.safetensors", shards)
    if dit_2 is not None:
        (out / "transformer_2").mkdir()
        (out / "transformer_2" / "config.json").write_text(json.dumps(tcfg, indent=2))
        _save_safetensors_sharded({dit_from_official(k): v for k, v in dit_2.state_dict().items()},
                                  out / "transformer_2", "diffusion_pytorch_model.safetensors", shards)
    del dit, dit_2
    vcfg = {"_class_name": "AutoencoderKLWan", "_diffusers_version": diffusers_version, **vae_cfg.to_diffusers_config()}
    (out / "vae" / "config.json").write_text(json.dumps(vcfg, indent=2))
    from_off = vae_key_mapper("diffusers", vae_cfg)
    _save_safetensors_sharded({from_off(k): v for k, v in vae.state_dict().items()},
                              out / "vae", "diffusion_pytorch_model.safetensors", 1)
    hf = dict(t5_cfg.to_hf_config())
    hf.setdefault("architectures", ["UMT5EncoderModel"])
    (out / "text_encoder" / "config.json").write_text(json.dumps(hf, indent=2))
    _save_safetensors_sharded({t5_from_official(k): v for k, v in t5.state_dict().items()},
                              out / "text_encoder", "model.safetensors", 1, metadata={"format": "pt"})
    build_tiny_tokenizer(out / "tokenizer", vocab_size=t5_cfg.vocab_size)
    sched = {
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": diffusers_version,
        "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
        "flow_shift": p.shift, "solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
        "final_sigmas_type": "zero", "predict_x0": True,
    }
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    return out


def _write_image_encoder(out: Path, clip_state: dict[str, torch.Tensor], cfg) -> None:
    """``image_encoder/`` (transformers CLIPVisionModel: config.json + model.safetensors) and
    ``image_processor/`` (CLIPImageProcessor: shortest side 224, center crop, CLIP mean/std) of a diffusers
    I2V pipeline."""
    from ..models.clip import CLIP_MEAN, CLIP_STD
    from .keymap_clip import transformers_clip_vision

    config, state = transformers_clip_vision(clip_state, cfg)
    (out / "image_encoder").mkdir()
    config = {"architectures": ["CLIPVisionModel"], **config}
    (out / "image_encoder" / "config.json").write_text(json.dumps(config, indent=2))
    _save_safetensors_sharded(state, out / "image_encoder", "model.safetensors", 1, metadata={"format": "pt"})
    (out / "image_processor").mkdir()
    processor = {
        "crop_size": {"height": cfg.image_size, "width": cfg.image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "image_processor_type": "CLIPImageProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": cfg.image_size},
    }
    (out / "image_processor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:
        return "0.33.0"


def cache_dir() -> Path:
    """wanrt's cache folder (:func:`wanrt.paths.cache_root`: ``$WANRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/wanrt``
    or ``~/.cache/wanrt``; read at call time)."""
    from ..paths import cache_root

    return cache_root()


#: The trained tiny model shipped in the package (:mod:`wanrt.demo.train`; see its MODEL_CARD.md).
TRAINED_TINY = Path(__file__).resolve().parent.parent / "demo" / "tiny"


def default_tiny_checkpoint(preset: str = "tiny") -> Path:
    """The checkpoint ``Engine(preset)`` loads when given none: for ``tiny`` the trained model shipped in the
    package (:data:`TRAINED_TINY`), for ``tiny-i2v`` / ``tiny-flf2v`` (and a source tree without the trained
    weights) a random checkpoint in the cache (:func:`cached_tiny_checkpoint`)."""
    if preset == "tiny" and (TRAINED_TINY / "config.json").is_file():
        return TRAINED_TINY
    return cached_tiny_checkpoint("official", preset)


def cached_tiny_checkpoint(layout: str = "official", preset: str = "tiny") -> Path:
    """A tiny checkpoint (``preset`` "tiny", "tiny-i2v" or "tiny-flf2v") in the user's cache folder, written on
    first use (atomically)."""
    if not is_tiny(get_preset(preset)):
        raise ValueError(f"only the tiny presets are cached, got {preset!r}")
    name = "tiny" if preset == "tiny" else preset
    final = cache_dir() / f"{name}-{layout}-v1"
    marker = "model_index.json" if layout == "diffusers" else \
        f"{OFFICIAL_EXPERTS[0]}/config.json" if get_preset(preset).is_moe else "config.json"
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    try:
        write_checkpoint(tmp / "ckpt", layout=layout, preset=preset)
        try:
            os.replace(tmp / "ckpt", final)
        except OSError:
            if not final.is_dir():  # another process won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
