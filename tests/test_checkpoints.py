"""Loading the official and diffusers layouts, sharded and single files, and every bad checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanrt
from wanrt.checkpoints.io import CheckpointError, open_tensor_source
from wanrt.checkpoints.layout import LayoutError, detect_layout
from wanrt.checkpoints.tiny import write_checkpoint


def _same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_detect_layouts(tiny_official, tiny_diffusers):
    o = detect_layout(tiny_official)
    assert o.kind == "official" and o.vae.name == "Wan2.1_VAE.pth" and o.tokenizer.is_dir()
    d = detect_layout(tiny_diffusers)
    assert d.kind == "diffusers" and d.transformer.name == "transformer" and d.text_encoder.is_dir()
    assert (tiny_diffusers / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_official_and_diffusers_layouts_load_identically(tiny_official, tiny_diffusers):
    """Same seed, two layouts (diffusers one sharded, renamed keys): identical official-key weights."""
    for loader in (wanrt.load_transformer, wanrt.load_vae):
        a = loader(tiny_official, device="cpu", dtype=torch.float32)
        b = loader(tiny_diffusers, device="cpu", dtype=torch.float32)
        _same_state(a, b)
    ta = wanrt.load_text_encoder(tiny_official, device="cpu", dtype=torch.float32)
    tb = wanrt.load_text_encoder(tiny_diffusers, device="cpu", dtype=torch.float32)
    _same_state(ta.model, tb.model)
    ea, eb = ta.encode(["a corgi surfing a wave"]), tb.encode(["a corgi surfing a wave"])
    torch.testing.assert_close(ea[0], eb[0], rtol=0, atol=0)


def test_single_file_and_sub_folders(tiny_official, tiny_diffusers, tmp_path):
    ref = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32)
    # one safetensors file, no config beside it: architecture inferred from shapes / metadata
    lone = tmp_path / "lone.safetensors"
    shutil.copy(tiny_official / "diffusion_pytorch_model.safetensors", lone)
    m = wanrt.load_transformer(lone, device="cpu", dtype=torch.float32)
    assert m.config.num_layers == ref.config.num_layers and m.config.dim == ref.config.dim
    _same_state(m, ref)
    # ComfyUI-style prefixed single file
    sd = load_file(str(lone))
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "comfy.safetensors"))
    m2 = wanrt.load_transformer(tmp_path / "comfy.safetensors", device="cpu", dtype=torch.float32,
                                config=ref.config)
    _same_state(m2, ref)
    # the diffusers transformer/ and vae/ folders on their own, and the bare .pth files
    _same_state(wanrt.load_transformer(tiny_diffusers / "transformer", device="cpu", dtype=torch.float32), ref)
    v1 = wanrt.load_vae(tiny_diffusers / "vae", device="cpu")
    v2 = wanrt.load_vae(tiny_official / "Wan2.1_VAE.pth", device="cpu")
    _same_state(v1, v2)
    t = wanrt.load_text_encoder(tiny_official / "models_t5_umt5-xxl-enc-bf16.pth", device="cpu", dtype=torch.float32)
    assert len(t.encode(["hello"])) == 1


def test_precision_keeps_sensitive_params_fp32(tiny_official):
    m = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in m.state_dict().items()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.ffn.0.weight"] == torch.bfloat16
    for k in ("blocks.0.modulation", "head.modulation", "head.head.weight", "time_embedding.0.weight",
              "time_projection.1.weight", "blocks.0.norm3.weight"):
        assert dtypes[k] == torch.float32, k
    t5 = wanrt.load_text_encoder(tiny_official, device="cpu")  # default bf16 like the official encoder
    assert next(t5.model.parameters()).dtype == torch.bfloat16


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wanrt.load_transformer(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(LayoutError, match="neither an official"):
        wanrt.load_transformer(tmp_path / "junk")
    with pytest.raises(LayoutError, match="neither an official"):
        wanrt.Engine("tiny", tmp_path / "junk")


@pytest.fixture()
def ckpt_copy(tiny_official, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_official, dst)
    return dst


def test_missing_key_is_named(ckpt_copy):
    f = ckpt_copy / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    del sd["blocks.1.ffn.2.bias"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"lacks a parameter.*blocks\.1\.ffn\.2\.bias") as e:
        wanrt.load_transformer(ckpt_copy, device="cpu")
    assert e.value.key == "blocks.1.ffn.2.bias"


def test_unexpected_key_is_named(ckpt_copy):
    f = ckpt_copy / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["blocks.0.mystery.weight"] = torch.zeros(3)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"unexpected key.*diffusion_pytorch_model\.safetensors.*mystery") as e:
        wanrt.load_transformer(ckpt_copy, device="cpu")
    assert e.value.key == "blocks.0.mystery.weight" and e.value.file.endswith(".safetensors")


def test_shape_mismatch_is_named(ckpt_copy):
    f = ckpt_copy / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"][:, :-1].contiguous()
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'blocks\.0\.self_attn\.q\.weight'"):
        wanrt.load_transformer(ckpt_copy, device="cpu")


def test_truncated_and_corrupt_files(ckpt_copy):
    f = ckpt_copy / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        wanrt.load_transformer(ckpt_copy, device="cpu")
    assert e.value.file == str(f)
    vae = ckpt_copy / "Wan2.1_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"corrupt, truncated.*Wan2\.1_VAE\.pth"):
        wanrt.load_vae(ckpt_copy, device="cpu")
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(LayoutError, match="not valid JSON"):
        wanrt.load_transformer(ckpt_copy, device="cpu")


def test_missing_shard_and_missing_parts(tiny_diffusers, tmp_path):
    dst = tmp_path / "d"
    shutil.copytree(tiny_diffusers, dst)
    index = json.loads((dst / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (dst / "transformer" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard}' named by the index is missing"):
        wanrt.load_transformer(dst, device="cpu")
    shutil.rmtree(dst / "vae")
    with pytest.raises(LayoutError, match="no VAE found"):
        wanrt.load_vae(dst, device="cpu")


def test_missing_vae_file_in_official(ckpt_copy):
    (ckpt_copy / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(LayoutError, match=r"no VAE found \(expected Wan2\.1_VAE\.pth"):
        wanrt.load_vae(ckpt_copy, device="cpu")


def test_tensor_source_is_lazy(tiny_diffusers):
    idx = tiny_diffusers / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    with open_tensor_source(idx) as src:
        assert len({src.file_of(k).name for k in src.keys()}) == 2
        k = "blocks.0.attn1.to_q.weight"
        assert src.shape(k) == tuple(src.get(k).shape)


def test_write_checkpoint_refuses_non_empty(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        write_checkpoint(tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    with pytest.raises(ValueError, match="layout"):
        write_checkpoint(tmp_path / "y", layout="comfy")


@pytest.mark.slow
def test_full_size_13b_checkpoint_layout(tmp_path):
    """The t2v-1.3b architecture written and read back on the meta device: 825 keys, 1.419 B params."""
    out = write_checkpoint(tmp_path / "big", preset="t2v-1.3b", shards=3)
    m = wanrt.load_transformer(out, device="cpu", dtype=torch.bfloat16)
    assert len(m.state_dict()) == 825
    assert abs(sum(p.numel() for p in m.parameters()) / 1e9 - 1.419) < 0.001


def test_unknown_diffusers_key_is_named(tiny_diffusers, tmp_path):
    dst = tmp_path / "d"
    shutil.copytree(tiny_diffusers / "transformer", dst)
    index = json.loads((dst / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = dst / sorted(set(index["weight_map"].values()))[0]
    sd = load_file(str(shard))
    sd["blocks.0.attn1.to_banana.weight"] = torch.zeros(2)
    sd["blocks.0.attn2.norm_added_q.weight"] = torch.zeros(2)  # ignored, as diffusers does
    save_file(sd, str(shard))
    index["weight_map"]["blocks.0.attn1.to_banana.weight"] = shard.name
    index["weight_map"]["blocks.0.attn2.norm_added_q.weight"] = shard.name
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected key") as e:
        wanrt.load_transformer(dst, device="cpu")
    assert e.value.key == "blocks.0.attn1.to_banana.weight" and e.value.file == str(shard)


def test_published_configs_give_the_official_architectures():
    """config.json files as the real releases ship them parse to the real architectures."""
    from wanrt.models.dit import DiTConfig
    from wanrt.models.t5 import UMT5Config
    from wanrt.models.vae import WAN21_LATENTS_MEAN, VAEConfig
    from wanrt.presets import Architecture, get_preset, preset_for_arch

    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
                "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
                "num_layers": 30, "out_dim": 16, "text_len": 512}
    diff = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
            "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None,
            "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
            "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
    a, b = DiTConfig.from_official_config(official), DiTConfig.from_diffusers_config(diff)
    assert a == b
    assert Architecture.from_dit(a) == get_preset("t2v-1.3b").arch
    assert preset_for_arch(Architecture.from_dit(a)) is get_preset("t2v-1.3b")
    i2v = dict(diff, added_kv_proj_dim=5120, image_dim=1280, in_channels=36, num_attention_heads=40, num_layers=40,
               ffn_dim=13824)
    assert DiTConfig.from_diffusers_config(i2v).model_type == "i2v"
    assert DiTConfig.from_diffusers_config(dict(i2v, pos_embed_seq_len=514)).model_type == "flf2v"
    vae = {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
           "dropout": 0.0, "latents_mean": list(WAN21_LATENTS_MEAN), "latents_std": [1.0] * 16,
           "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16, "in_channels": 3,
           "out_channels": 3, "is_residual": False, "patch_size": None, "scale_factor_temporal": 4,
           "scale_factor_spatial": 8, "clip_output": True, "decoder_base_dim": None}
    assert VAEConfig.from_diffusers_config(vae).base_dim == 96
    t5 = {"architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
          "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_heads": 64,
          "num_layers": 24, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
          "vocab_size": 256384}
    assert UMT5Config.from_hf_config(t5) == UMT5Config()


def test_architecture_inferred_from_shapes_of_real_sizes():
    """Wan2.1_VAE.pth and lone DiT files carry no config: the shapes of the real models give it back."""
    from wanrt.checkpoints.loaders import dit_config_from_shapes, vae_config_from_shapes
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import WanDiT
    from wanrt.models.vae import VAEConfig, WanVAE
    from wanrt.presets import get_preset

    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
        shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        assert vae_config_from_shapes(shapes) == VAEConfig()
        for name in ("t2v-1.3b", "t2v-14b", "i2v-14b-480p", "flf2v-14b"):
            cfg = dit_config_for(get_preset(name))
            dit = WanDiT(cfg)
            got = dit_config_from_shapes({k: tuple(v.shape) for k, v in dit.state_dict().items()})
            assert got == cfg, name


def test_bad_dtype_and_device(tiny_official):
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="invalid device"):
        wanrt.load_vae(tiny_official, device="tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            wanrt.load_transformer(tiny_official, device="cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            wanrt.Engine("tiny", tiny_official, device="cuda")
