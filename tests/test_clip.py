"""CLIP ViT-H/14 image encoder: parity with transformers, official layout, key maps, preprocessing, loader errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import wanrt
from wanrt.checkpoints.io import CheckpointError
from wanrt.checkpoints.keymap_clip import (
    clip_from_official,
    clip_from_transformers,
    clip_to_official,
    clip_to_transformers,
    transformers_clip_vision,
)
from wanrt.checkpoints.layout import OFFICIAL_CLIP, LayoutError, detect_layout
from wanrt.checkpoints.tiny import official_clip_state
from wanrt.models.clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionTower, ImageEncoder, preprocess
from wanrt.testing import TOLERANCES, Tolerance, assert_close, relative_error

transformers = pytest.importorskip("transformers")

# head_dim 80 as ViT-H/14; 224 px / patch 14 -> 257 tokens; 56 px -> 17 tokens
TINY = CLIPVisionConfig(dim=160, mlp_dim=640, num_heads=2, num_layers=3)
TINY56 = CLIPVisionConfig(image_size=56, dim=160, mlp_dim=320, num_heads=2, num_layers=4)
FP32 = TOLERANCES[torch.float32]


def hf_model(cfg: CLIPVisionConfig, seed: int = 0):
    """transformers CLIPVisionModel of ``cfg`` with seeded random weights keeping activations O(1)."""
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg.to_hf_config(projection_dim=32)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                v = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.02 * torch.randn(p.shape, generator=g)
            elif "embedding" in name and "patch" not in name:
                v = 0.5 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1:].numel())
            p.copy_(v)
    return model.eval()


def hf_penultimate(model, pixels: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan I2V image embedding: ``hidden_states[-2]`` of the CLIPVisionModel."""
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def pixels_for(cfg: CLIPVisionConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)


def write_official(folder, state: dict[str, torch.Tensor]):
    """An official-layout checkpoint folder holding only the CLIP file (and a WanModel config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"dim": 64, "num_heads": 2, "num_layers": 1, "model_type": "i2v"}))
    torch.save(state, folder / OFFICIAL_CLIP)
    return folder


def write_diffusers(root, hf=None, *, config=None, state=None):
    """A diffusers-pipeline-like folder with ``image_encoder/`` (saved by transformers, or from a state dict)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    (root / "transformer").mkdir()
    if hf is not None:
        hf.save_pretrained(root / "image_encoder", max_shard_size="1MB")  # sharded, with an index
    else:
        (root / "image_encoder").mkdir()
        (root / "image_encoder" / "config.json").write_text(json.dumps(config))
        save_file(state, str(root / "image_encoder" / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """(folder, full official fp32 state) of TINY."""
    state = official_clip_state(TINY, seed=3)
    return write_official(tmp_path_factory.mktemp("clip") / "official", state), state


# ------------------------------------------------------------------------------------------- config
def test_config_defaults_and_validation():
    cfg = CLIPVisionConfig()
    assert (cfg.num_patches, cfg.num_tokens, cfg.head_dim, cfg.used_layers) == (256, 257, 80, 31)
    assert (TINY56.num_tokens, TINY56.used_layers) == (17, 3)
    for bad in (dict(image_size=225), dict(dim=1280, num_heads=12), dict(num_layers=1), dict(dim=0),
                dict(eps=0.0), dict(patch_size=14.0), dict(mlp_dim=True)):
        with pytest.raises(ValueError):
            CLIPVisionConfig(**bad)


def test_config_hf_round_trip():
    assert CLIPVisionConfig.from_hf_config(TINY.to_hf_config()) == TINY
    hf_cfg = transformers.CLIPVisionConfig(**TINY56.to_hf_config())  # transformers accepts our dict
    assert CLIPVisionConfig.from_hf_config(hf_cfg) == TINY56  # object with to_dict()
    vit_h = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
             "patch_size": 14, "image_size": 224, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
             "model_type": "clip_vision_model", "projection_dim": 1024}
    assert CLIPVisionConfig.from_hf_config(vit_h) == CLIPVisionConfig()
    assert CLIPVisionConfig.from_hf_config({"model_type": "clip", "vision_config": vit_h}) == CLIPVisionConfig()
    with pytest.raises(ValueError, match="gelu"):
        CLIPVisionConfig.from_hf_config({**vit_h, "hidden_act": "quick_gelu"})  # OpenAI CLIP, not Wan's
    with pytest.raises(ValueError):
        CLIPVisionConfig.from_hf_config({**vit_h, "model_type": "siglip_vision_model"})
    with pytest.raises(KeyError):
        CLIPVisionConfig.from_hf_config({"hidden_size": 1280})


def _full_official_shapes(cfg: CLIPVisionConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of a FULL official visual state (all num_layers blocks), built on the meta device."""
    import dataclasses

    with torch.device("meta"):
        full = CLIPVisionTower(dataclasses.replace(cfg, num_layers=cfg.num_layers + 1))
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    return {**shapes, "post_norm.weight": (cfg.dim,), "post_norm.bias": (cfg.dim,), "head": (cfg.dim, 1024)}


def test_config_from_official_shapes():
    vit_h = CLIPVisionConfig()
    assert CLIPVisionConfig.from_official_shapes(_full_official_shapes(vit_h)) == vit_h  # 1280 -> 16 heads of 80
    assert CLIPVisionConfig.from_official_shapes(_full_official_shapes(TINY)) == TINY
    assert CLIPVisionConfig.from_official_shapes(_full_official_shapes(TINY56)) == TINY56
    vit_l = CLIPVisionConfig(dim=1024, mlp_dim=4096, num_heads=16, num_layers=24)
    assert CLIPVisionConfig.from_official_shapes(_full_official_shapes(vit_l)) == vit_l  # 1024 -> 16 heads of 64
    overridden = CLIPVisionConfig.from_official_shapes(_full_official_shapes(vit_h), num_heads=20)
    assert overridden.num_heads == 20 and overridden.head_dim == 64
    shapes = _full_official_shapes(TINY)
    with pytest.raises(ValueError, match="square"):
        CLIPVisionConfig.from_official_shapes({**shapes, "pos_embedding": (1, 250, 160)})
    with pytest.raises(ValueError):
        CLIPVisionConfig.from_official_shapes({k: v for k, v in shapes.items() if not k.startswith("transformer.")})
    with pytest.raises(KeyError):
        CLIPVisionConfig.from_official_shapes({k: v for k, v in shapes.items() if k != "patch_embedding.weight"})


def test_meta_construction_full_size():
    cfg = CLIPVisionConfig()
    with torch.device("meta"):
        model = CLIPVisionTower(cfg)
    sd = model.state_dict()
    assert len(model.transformer) == 31 and not list(model.buffers())
    assert {k for k in sd if k.startswith("transformer.30.")} and not any(k.startswith("transformer.31.") for k in sd)
    official = {"visual." + k for k in _full_official_shapes(cfg)}
    assert {clip_to_official(k) for k in sd} == {k for k in official if clip_from_official(k, 31) is not None}
    shapes = _full_official_shapes(cfg)
    assert all(tuple(v.shape) == shapes[k] for k, v in sd.items())  # same shapes as the official file
    d, m = 1280, 5120
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    assert sum(p.numel() for p in model.parameters()) == d * 3 * 14 * 14 + d + 257 * d + 2 * d + 31 * per_block
    fp32 = {k for k in sd if CLIPVisionTower.keep_fp32(k)}
    assert fp32 == {"pre_norm.weight", "pre_norm.bias"} | {
        f"transformer.{n}.norm{i}.{p}" for n in range(31) for i in (1, 2) for p in ("weight", "bias")}


# ------------------------------------------------------------------------------------------ key maps
def test_official_key_map():
    assert clip_from_official("visual.transformer.1.attn.to_qkv.weight", 2) == "transformer.1.attn.to_qkv.weight"
    assert clip_from_official("visual.cls_embedding", 2) == "cls_embedding"
    for dropped in ("visual.transformer.2.mlp.0.weight", "visual.post_norm.weight", "visual.head",
                    "textual.token_embedding.weight", "textual.blocks.0.attn.q.weight", "log_scale"):
        assert clip_from_official(dropped, 2) is None, dropped
    for unknown in ("visual.transformer.0.attn.q.weight", "visual.foo", "patch_embedding.weight", "scale"):
        with pytest.raises(KeyError):
            clip_from_official(unknown, 2)
    with pytest.raises(KeyError):
        clip_to_official("transformer.0.ffn.weight")
    for key in CLIPVisionTower(TINY).state_dict():
        assert clip_from_official(clip_to_official(key), TINY.used_layers) == key


@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_transformers_key_map(prefix):
    hf_keys = [prefix + k for k in hf_model(TINY).state_dict()]
    ours = CLIPVisionTower(TINY).state_dict()
    seen: dict[str, set] = {}
    for k in hf_keys:
        mapped = clip_from_transformers(k, TINY.used_layers)
        if mapped is None:
            assert "post_layernorm" in k or f"layers.{TINY.used_layers}." in k, k
            continue
        seen.setdefault(mapped[0], set()).add(mapped[1])
    assert set(seen) == set(ours)
    assert all(slots == ({0, 1, 2} if "to_qkv" in key else {None}) for key, slots in seen.items())
    for key in ours:
        names = clip_to_transformers(key, prefix)
        assert [clip_from_transformers(n, TINY.used_layers) for n in names] == (
            [(key, i) for i in range(3)] if len(names) == 3 else [(key, None)])
    for dropped in ("vision_model.embeddings.position_ids", "visual_projection.weight", "logit_scale",
                    "text_model.embeddings.token_embedding.weight"):
        assert clip_from_transformers(dropped, 2) is None
    with pytest.raises(KeyError):
        clip_from_transformers("vision_model.encoder.layers.0.self_attn.qkv.weight", 2)


# ------------------------------------------------------------------------------------ parity + layouts
@pytest.mark.parametrize("cfg", [TINY, TINY56], ids=["224px-257tok", "56px-17tok"])
def test_parity_with_transformers_clip_vision(cfg, tmp_path):
    hf = hf_model(cfg)
    pixels = pixels_for(cfg)
    ref = hf_penultimate(hf, pixels)
    pipeline = write_diffusers(tmp_path / "pipe", hf)
    assert detect_layout(pipeline).image_encoder == pipeline / "image_encoder"
    for path in (pipeline, pipeline / "image_encoder"):
        enc = wanrt.load_image_encoder(path, device="cpu", dtype=torch.float32)
        assert isinstance(enc, ImageEncoder) and enc.config == cfg and enc.dtype == torch.float32
        assert len(enc.model.transformer) == cfg.used_layers
        with torch.no_grad():
            out = enc.model(pixels)
        assert out.shape == (2, cfg.num_tokens, cfg.dim) and out.dtype == torch.float32
        assert_close(out, ref, name=f"tower vs hidden_states[-2] ({path.name})")


def test_official_layout_matches_transformers(official_ckpt, tmp_path):
    """official_clip_state -> .pth loads (folder and file) and equals the CLIPVisionModel that
    transformers_clip_vision makes of the same state (both writers and both key maps)."""
    folder, state = official_ckpt
    assert any(k.startswith("textual.") for k in state) and "log_scale" in state and "visual.head" in state
    assert f"visual.transformer.{TINY.num_layers - 1}.mlp.2.weight" in state  # the full tower was written
    assert detect_layout(folder).image_encoder == folder / OFFICIAL_CLIP
    hf_cfg, hf_state = transformers_clip_vision(state, TINY)
    assert all(k.startswith("vision_model.") for k in hf_state) and hf_cfg["model_type"] == "clip_vision_model"
    pipe = write_diffusers(tmp_path / "pipe", config=hf_cfg, state=hf_state)
    # transformers reads the vision_model.-prefixed file (as released by diffusers) itself
    hf = transformers.CLIPVisionModel.from_pretrained(pipe / "image_encoder").eval()
    unprefixed = transformers_clip_vision(state, TINY, prefix="")[1]
    assert all(torch.equal(v, unprefixed[k]) for k, v in hf.state_dict().items())
    pixels = pixels_for(TINY)
    ref = hf_penultimate(hf, pixels)
    outs = []
    for path in (folder, folder / OFFICIAL_CLIP, pipe):
        enc = wanrt.load_image_encoder(path, device="cpu", dtype=torch.float32)
        assert enc.config == TINY and len(enc.model.transformer) == TINY.used_layers
        assert set(enc.model.state_dict()) == set(CLIPVisionTower(TINY).state_dict())
        with torch.no_grad():
            outs.append(enc.model(pixels))
        assert_close(outs[-1], ref, name=f"{path.name} vs transformers")
    assert torch.equal(outs[0], outs[2])  # same numbers from both layouts
    torch.testing.assert_close(enc.model.cls_embedding, state["visual.cls_embedding"], rtol=0, atol=0)
    torch.testing.assert_close(enc.model.transformer[1].attn.to_qkv.weight,
                               state["visual.transformer.1.attn.to_qkv.weight"], rtol=0, atol=0)


def test_single_transformers_file_infers_config(official_ckpt, tmp_path):
    """A bare transformers-layout .safetensors (no config.json) loads with the shape-inferred config."""
    from safetensors.torch import save_file

    _, state = official_ckpt
    save_file(transformers_clip_vision(state, TINY)[1], str(tmp_path / "clip_vision.safetensors"))
    enc = wanrt.load_image_encoder(tmp_path / "clip_vision.safetensors", device="cpu", dtype=torch.float32)
    assert enc.config == TINY
    ref = wanrt.load_image_encoder(official_ckpt[0], device="cpu", dtype=torch.float32)
    pixels = pixels_for(TINY, batch=1)
    with torch.no_grad():
        assert torch.equal(enc.model(pixels), ref.model(pixels))


# ---------------------------------------------------------------------------------------- preprocess
def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> torch.Tensor:
    """[n_out, n_in] float64 weights of a 1-D bicubic resize, align_corners=False, edge-clamped (Keys a=-0.75).

    The source coordinate ``(i + 0.5)·n_in/n_out - 0.5`` is rounded to float32 as torch computes it
    (float32 "opmath"); at ~300 px its rounding alone moves sharp images by ~1e-4.
    """
    f32 = torch.float32

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = torch.tensor(n_in / n_out, dtype=f32) * torch.tensor(i + 0.5, dtype=f32) - torch.tensor(0.5, dtype=f32)
        x0 = math.floor(src.item())
        t = float(src - torch.tensor(x0, dtype=f32))
        for j, d in zip(range(x0 - 1, x0 + 3), (1 + t, t, 1 - t, 2 - t)):
            w[i, min(max(j, 0), n_in - 1)] += kernel(d)
    return w


def _reference_preprocess(img: torch.Tensor, size: int = 224, a: float = -0.75) -> torch.Tensor:
    """The official steps, written out in float64: squash bicubic resize, x*0.5+0.5, (x-mean)/std."""
    x = img.double()
    x = _bicubic_matrix(x.shape[1], size, a) @ x @ _bicubic_matrix(x.shape[2], size, a).T  # [3, size, size]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


def test_preprocess_matches_reference():
    wide, tall = _image(37, 61, 0), _image(300, 170, 1)  # upsampled / downsampled, non-square
    out = preprocess([wide, tall])
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    # torch sums the 16 taps of pixel noise in float32: up to ~5e-5 off after the 1/std scaling, while a
    # wrong kernel (PIL's a=-0.5), an antialiased resize or a crop is off by > 1e-2.
    tol = Tolerance(atol=1e-4, rtol=1e-4, rel=1e-5)
    for i, img in enumerate((wide, tall)):
        assert_close(out[i], _reference_preprocess(img), tol=tol, name=f"image {i}")
        assert relative_error(out[i], _reference_preprocess(img, a=-0.5)) > 1e-2
    antialiased = F.interpolate(tall[None], size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    assert relative_error(out[1], (antialiased[0] * 0.5 + 0.5 - _MEAN) / _STD) > 1e-2
    # a [B,3,H,W] tensor, a single [3,H,W] image and other float dtypes give the same
    same = torch.stack([wide, _image(37, 61, 2)])
    torch.testing.assert_close(preprocess(same)[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(preprocess(wide)[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(preprocess([wide.double()])[0], out[0], rtol=0, atol=0)
    assert preprocess([tall], size=56).shape == (1, 3, 56, 56)


def test_preprocess_differs_from_clip_image_processor():
    """diffusers' CLIPImageProcessor crops the center of a non-square image (shortest side -> 224, center
    crop), the official code squashes the whole image: identical on a 224x224 image, different otherwise."""
    import numpy as np
    from PIL import Image

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
               do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    rng = np.random.default_rng(0)

    def both(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish content
        arr = np.array(Image.fromarray(base).resize((w, h), Image.BILINEAR))
        theirs = proc(images=Image.fromarray(arr), return_tensors="pt")["pixel_values"]
        ours = preprocess([torch.from_numpy(arr).permute(2, 0, 1).float() / 255 * 2 - 1])
        return ours, theirs

    ours, theirs = both(224, 224)
    assert_close(ours, theirs, dtype=torch.float32, name="square 224 image")
    ours, theirs = both(224, 448)  # 1:2, the processor keeps only the middle half
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert relative_error(ours, theirs) > 0.2


# ------------------------------------------------------------------------------- dtype, batch, wrapper
def test_fp16_close_to_fp32_and_batch_equals_singles(tmp_path):
    state16 = official_clip_state(TINY, seed=5, dtype=torch.float16)  # the real file is fp16
    folder = write_official(tmp_path / "fp16", state16)
    enc16 = wanrt.load_image_encoder(folder, device="cpu")  # default dtype: fp16, as official clip_dtype
    enc32 = wanrt.load_image_encoder(folder, device="cpu", dtype=torch.float32)
    assert enc16.dtype == torch.float16 and enc16.device == torch.device("cpu")
    assert enc16.model.pre_norm.weight.dtype == torch.float32  # keep_fp32: LayerNorms
    assert enc16.model.transformer[0].norm2.bias.dtype == torch.float32
    assert enc16.model.transformer[0].attn.to_qkv.weight.dtype == torch.float16
    images = [_image(120, 200, 7), _image(90, 90, 8)]
    out16, out32 = enc16.encode(images), enc32.encode(images)
    assert out16.shape == out32.shape == (2, TINY.num_tokens, TINY.dim) and out16.dtype == torch.float16
    assert_close(out16, out32, tol=Tolerance(atol=3e-2, rtol=3e-2, rel=5e-3), name="fp16 vs fp32")
    singles = torch.cat([enc32.encode([img]) for img in images])
    assert_close(out32, singles, name="batch of 2 vs two single runs")
    assert torch.equal(enc32(images[0]), enc32.encode([images[0]]))  # __call__, bare [3, H, W] image


def test_tower_rejects_bad_pixels():
    model = CLIPVisionTower(TINY56)
    for shape in ((1, 3, 224, 224), (3, 56, 56), (1, 4, 56, 56)):
        with pytest.raises(ValueError):
            model(torch.zeros(shape))


@pytest.mark.parametrize(
    "images, error",
    [
        ([], ValueError),
        ([torch.zeros(4, 8, 8)], ValueError),
        ([torch.zeros(1, 8, 8)], ValueError),
        ([torch.zeros(3, 0, 8)], ValueError),
        ([torch.zeros(3, 8, 8), torch.zeros(3, 8)], ValueError),
        ([torch.zeros(3, 8, 8, dtype=torch.uint8)], TypeError),
        ([torch.zeros(3, 8, 8).numpy()], TypeError),
        (torch.zeros(2, 1, 8, 8), ValueError),
        (torch.zeros(0, 3, 8, 8), ValueError),
        (torch.zeros(8, 8), ValueError),
        (torch.zeros(1, 1, 3, 8, 8), ValueError),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int64), TypeError),
        ("image.png", TypeError),
    ],
)
def test_preprocess_rejects_bad_input(images, error):
    with pytest.raises(error):
        preprocess(images)


def test_preprocess_rejects_bad_size():
    with pytest.raises(ValueError):
        preprocess([torch.zeros(3, 8, 8)], size=0)


# -------------------------------------------------------------------------------------- loader errors
def test_missing_key_names_file_and_key(official_ckpt, tmp_path):
    _, state = official_ckpt
    key = "visual.transformer.1.mlp.2.bias"
    folder = write_official(tmp_path / "missing", {k: v for k, v in state.items() if k != key})
    with pytest.raises(CheckpointError, match="lacks") as e:
        wanrt.load_image_encoder(folder, device="cpu")
    assert e.value.key == key and OFFICIAL_CLIP in str(e.value) and key in str(e.value)

    hf_cfg, hf_state = transformers_clip_vision(state, TINY)
    for gone in ("vision_model.encoder.layers.0.self_attn.k_proj.weight", "vision_model.pre_layrnorm.bias"):
        pipe = write_diffusers(tmp_path / gone, config=hf_cfg, state={k: v for k, v in hf_state.items() if k != gone})
        with pytest.raises(CheckpointError) as e:
            wanrt.load_image_encoder(pipe, device="cpu")
        assert e.value.key == gone and "model.safetensors" in str(e.value) and gone in str(e.value)
    # a dropped key (the unused last layer, post_layernorm) may be missing
    unused = {k: v for k, v in hf_state.items() if "post_layernorm" not in k and "layers.2." not in k}
    pipe = write_diffusers(tmp_path / "unused", config=hf_cfg, state=unused)
    assert wanrt.load_image_encoder(pipe, device="cpu").config == TINY


def test_unexpected_key_names_file_and_key(official_ckpt, tmp_path):
    _, state = official_ckpt
    key = "visual.transformer.0.attn.q_norm.weight"
    folder = write_official(tmp_path / "extra", {**state, key: torch.ones(TINY.dim)})
    with pytest.raises(CheckpointError, match="unexpected") as e:
        wanrt.load_image_encoder(folder, device="cpu")
    assert e.value.key == key and OFFICIAL_CLIP in str(e.value)


def test_shape_mismatch_names_file_and_key(official_ckpt, tmp_path):
    _, state = official_ckpt
    key = "visual.transformer.1.mlp.2.weight"
    folder = write_official(tmp_path / "shape", {**state, key: torch.zeros(TINY.dim, TINY.mlp_dim + 1)})
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        wanrt.load_image_encoder(folder, device="cpu")
    assert e.value.key == key and OFFICIAL_CLIP in str(e.value)
    # a transformers config that disagrees with the weights
    hf_cfg, hf_state = transformers_clip_vision(state, TINY)
    pipe = write_diffusers(tmp_path / "cfg", config={**hf_cfg, "intermediate_size": 320}, state=hf_state)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        wanrt.load_image_encoder(pipe, device="cpu")


def test_no_image_encoder_in_t2v_checkpoint(tiny_official, tmp_path):
    assert detect_layout(tiny_official).image_encoder is None
    with pytest.raises(LayoutError) as e:
        wanrt.load_image_encoder(tiny_official, device="cpu")
    assert OFFICIAL_CLIP in str(e.value) and "text-to-video" in str(e.value)
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(LayoutError, match="image_encoder/"):
        wanrt.load_image_encoder(pipe, device="cpu")
    with pytest.raises(FileNotFoundError):
        wanrt.load_image_encoder(tmp_path / "nowhere")


def test_not_a_clip_file(tmp_path):
    torch.save({"blocks.0.attn.q.weight": torch.zeros(2, 2)}, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match="neither") as e:
        wanrt.load_image_encoder(tmp_path / "t5.pth", device="cpu")
    assert "t5.pth" in str(e.value)
    with pytest.raises(ValueError):
        wanrt.load_image_encoder(tmp_path / "t5.pth", dtype=torch.int8)
