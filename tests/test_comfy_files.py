"""An Engine from ComfyUI's single files (``Engine(model, files={...})``, ``--dit --text-encoder --vae
--image-encoder``): tiny stand-ins written in the layouts small-card users download — a DiT safetensors with the
``model.diffusion_model.`` prefix, ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (transformers keys, scaled fp8 weights,
the SentencePiece model embedded as a ``spiece_model`` tensor), ``wan_2.1_vae.safetensors`` and
``clip_vision_h.safetensors``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import wanrt
from wanrt.checkpoints.keymap_t5 import t5_from_official
from wanrt.checkpoints.tiny import cached_tiny_checkpoint, default_tiny_checkpoint

KW = dict(precision="fp32", backend="eager", prompt_cache_size=0)
OPTS = dict(seed=2, num_inference_steps=3, height=48, width=80, num_frames=9)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _write(folder, preset: str, *, t5: str = "fp32", spiece: bool = True, ck=None) -> dict:
    """ComfyUI-style single files of the tiny checkpoint ``preset`` (or the folder ``ck``) under ``folder``;
    returns ``files``."""
    ck = ck or default_tiny_checkpoint(preset)  # tiny: the trained model (dim 128); the others: random fixtures
    folder.mkdir(parents=True, exist_ok=True)
    files = {"dit": folder / "wan2.1_tiny.safetensors", "text_encoder": folder / f"umt5_xxl_{t5}.safetensors",
             "vae": folder / "wan_2.1_vae.safetensors"}
    dit = load_file(ck / "diffusion_pytorch_model.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in dit.items()}, files["dit"])
    state = {}
    for k, v in torch.load(ck / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True).items():
        key = t5_from_official(k)
        if t5 == "fp8_e4m3fn_scaled" and v.ndim == 2 and key != "shared.weight":
            scale = v.float().abs().max() / 448
            state[key] = (v.float() / scale).to(torch.float8_e4m3fn)
            state[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            state[key] = v
    if t5 == "fp8_e4m3fn_scaled":
        state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    if spiece:
        model = (ck / "google/umt5-xxl/spiece.model").read_bytes()
        state["spiece_model"] = torch.frombuffer(bytearray(model), dtype=torch.uint8)
    save_file(state, files["text_encoder"])
    vae = torch.load(ck / "Wan2.1_VAE.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in vae.items()}, files["vae"])
    clip = ck / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    if clip.is_file():
        files["image_encoder"] = folder / "clip_vision_h.safetensors"
        sd = torch.load(clip, weights_only=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, files["image_encoder"])
    return files


def test_engine_from_single_files_equals_the_folder_engine(tmp_path):
    files = _write(tmp_path / "comfy", "tiny")
    ref = wanrt.Engine("tiny", **KW).generate("a cat", progress=False, **OPTS)
    eng = wanrt.Engine("tiny", files=files, **KW)
    video = eng.generate("a cat", progress=False, **OPTS)
    # The same weights; the CPU GEMMs may round differently with the tensors at other memory alignments (a file's
    # offsets), so equal within float32 rounding rather than bit for bit.
    assert _rel(video.latents, ref.latents) < 1e-5
    assert np.abs(video.frames.astype(int) - ref.frames.astype(int)).max() <= 1
    assert eng.preset.arch.dim == 128


def test_single_files_of_a_random_fixture_load_at_its_size(tmp_path):
    """The ``tiny`` preset accepts two sizes; single files carry no config, so the DiT file's shapes choose."""
    fixture = cached_tiny_checkpoint("official", "tiny")
    files = _write(tmp_path / "comfy", "tiny", ck=fixture)
    eng = wanrt.Engine("tiny", files=files, **KW)
    assert eng.preset.arch.dim == 64 and eng.transformer.config.num_heads == 2
    ref = wanrt.Engine("tiny", fixture, **KW).generate("a cat", progress=False, **OPTS)
    assert _rel(eng.generate("a cat", progress=False, **OPTS).latents, ref.latents) < 1e-5


def test_scaled_fp8_text_encoder_with_its_embedded_tokenizer(tmp_path):
    files = _write(tmp_path / "comfy", "tiny", t5="fp8_e4m3fn_scaled")
    folder = wanrt.load_text_encoder(default_tiny_checkpoint("tiny"), device="cpu", dtype=torch.float32)
    single = wanrt.load_text_encoder(files["text_encoder"], device="cpu", dtype=torch.float32)
    prompts = ["a corgi surfing a wave", "镜头晃动，色调艳丽"]
    for a, b in zip(folder.tokenize(prompts), single.tokenize(prompts), strict=True):
        assert torch.equal(a, b)  # the embedded SentencePiece model gives the folder's token ids
    for a, b in zip(folder.encode(prompts), single.encode(prompts), strict=True):
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 0.15, rel  # fp8 e4m3 with one scale per tensor: measured 0.066-0.079 (random weights)
    video = wanrt.Engine("tiny", files=files, **KW).generate("a cat", progress=False, **OPTS)
    assert video.frames.shape == (9, 48, 80, 3)


def test_i2v_engine_from_single_files(tmp_path):
    files = _write(tmp_path / "comfy", "tiny-i2v")
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    ref = wanrt.Engine("tiny-i2v", **KW).generate("a cat", progress=False, image=image, **OPTS)
    video = wanrt.Engine("tiny-i2v", files=files, **KW).generate("a cat", progress=False, image=image, **OPTS)
    assert _rel(video.latents, ref.latents) < 1e-5  # measured 3e-7: alignment-dependent CPU GEMM rounding


def test_single_file_errors_name_the_part_and_the_file(tmp_path):
    from wanrt.checkpoints.io import CheckpointError
    from wanrt.checkpoints.layout import LayoutError

    files = _write(tmp_path / "comfy", "tiny", spiece=False)
    with pytest.raises(ValueError, match=r"files: missing \['vae'\]"):
        wanrt.Engine("tiny", files={k: v for k, v in files.items() if k != "vae"}, **KW)
    with pytest.raises(ValueError, match="missing.*image_encoder"):
        wanrt.Engine("tiny-i2v", files=files, **KW)
    with pytest.raises(FileNotFoundError, match=r"files\['dit'\]"):
        wanrt.Engine("tiny", files={**files, "dit": tmp_path / "nope.safetensors"}, **KW)
    with pytest.raises(ValueError, match="unknown part"):
        wanrt.Engine("tiny", files={**files, "lora": files["dit"]}, **KW)
    with pytest.raises(LayoutError, match="carries no tokenizer.*tokenizer="):
        wanrt.Engine("tiny", files=files, **KW)
    tok = cached_tiny_checkpoint("official", "tiny") / "google" / "umt5-xxl"
    wanrt.Engine("tiny", files={**files, "tokenizer": tok}, **KW)  # a tokenizer folder beside the file
    # a scaled-fp8 weight whose scale is missing: named, not a raw KeyError
    state = load_file(_write(tmp_path / "fp8", "tiny", t5="fp8_e4m3fn_scaled")["text_encoder"])
    key = next(k for k in state if k.endswith(".scale_weight"))
    del state[key]
    broken = tmp_path / "broken_umt5.safetensors"
    save_file(state, broken)
    with pytest.raises(CheckpointError, match="without its scale_weight") as err:
        wanrt.load_text_encoder(broken, device="cpu", dtype=torch.float32)
    assert "broken_umt5.safetensors" in str(err.value) and key in str(err.value)


def test_cli_single_files(tmp_path, capsys):
    from wanrt.cli import main

    files = _write(tmp_path / "comfy", "tiny")
    out = tmp_path / "o.mp4"
    rc = main(["generate", "--prompt", "a cat", "--dit", str(files["dit"]), "--text-encoder",
               str(files["text_encoder"]), "--vae", str(files["vae"]), "--height", "48", "--width", "80",
               "--steps", "2", "--precision", "fp32", "--device", "cpu", "--no-progress", "-o", str(out)])
    assert rc == 0 and out.is_file()
    rc = main(["generate", "--prompt", "a cat", "--dit", str(files["dit"]), "--vae", str(files["vae"]),
               "-o", str(out)])
    assert rc == 2 and "missing ['text_encoder']" in capsys.readouterr().err
