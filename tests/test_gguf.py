"""GGUF DiT checkpoints: the PyTorch dequantizers against the ``gguf`` package's NumPy ones (every supported type),
tiny GGUF files written with the package's writer, loaded by ``load_transformer`` and an Engine, and the DiT output
against the float model within each type's error."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # in the test extra; a missing package is an install error, not a skip in CI

from wanrt.quant.gguf import BLOCKS, GGUFLinear, dequantize  # noqa: E402
from wanrt.testing import random_gguf_blocks as _random_blocks  # noqa: E402

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", list(BLOCKS))
def test_dequantize_matches_the_gguf_package(qtype):
    per = BLOCKS[qtype][0]
    raw = _random_blocks(qtype, 5, 3 * per)
    ref = gguf.quants.dequantize(raw, getattr(T, qtype))
    got = dequantize(torch.from_numpy(raw), qtype, (5, 3 * per))
    assert got.shape == ref.shape and torch.equal(got, torch.from_numpy(ref.astype(np.float32)))


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="do not hold a weight"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (1, 32))
    with pytest.raises(ValueError, match="unsupported GGUF quantization 'Q2_K'"):
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q2_K", (1, 32))
    with pytest.raises(ValueError, match="divisible by 256"):
        GGUFLinear(64, 8, "Q4_K")


# ------------------------------------------------------------------------------------------------- whole files


def _model(dim: int, ffn: int):
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import WanDiT
    from wanrt.presets import get_preset

    cfg = dataclasses.replace(dit_config_for(get_preset("tiny")), dim=dim, ffn_dim=ffn, num_layers=2)
    torch.manual_seed(0)
    return WanDiT(cfg).eval()


def _write_gguf(path, model, qtype, float_type=T.F32):
    """``model``'s state in GGUF: the blocks' Linear weights in ``qtype`` (a type name, or a function of the key
    giving one: files like Q4_K_M mix types) (quantized by the package for the 32-value types, random valid blocks
    for the K types: the package cannot quantize those), the rest in ``float_type`` (F32 for the keep_fp32
    tensors). Returns the dequantized Linear weights the file holds."""
    from wanrt.models.dit import WanDiT

    w = gguf.GGUFWriter(str(path), "wan")
    qtype_of = qtype if callable(qtype) else (lambda key: qtype)
    held = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        x = value.detach().float().numpy()
        if key.startswith(("blocks.", "vace_blocks.")) and key.endswith(".weight") and x.ndim == 2:
            qtype = qtype_of(key)
            if qtype in ("Q8_0", "Q4_0", "Q5_0"):
                q = gguf.quants.quantize(x, getattr(T, qtype))
            else:
                q = _random_blocks(qtype, *x.shape, seed=i)
            w.add_tensor(key, q, raw_shape=q.shape, raw_dtype=getattr(T, qtype))
            held[key] = torch.from_numpy(gguf.quants.dequantize(q, getattr(T, qtype)).astype(np.float32))
            continue
        if x.ndim > 4:  # as ComfyUI-GGUF: flattened, the shape in the metadata
            w.add_array(f"comfy.gguf.orig_shape.{key}", list(x.shape))
            x = x.reshape(x.shape[0], -1)
        if WanDiT.keep_fp32(key) or float_type == T.F32:
            w.add_tensor(key, x.astype(np.float32))
        elif float_type == T.F16:
            w.add_tensor(key, x.astype(np.float16))
        else:
            q = gguf.quants.quantize(x, T.BF16)
            w.add_tensor(key, q, raw_shape=q.shape, raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, 3, 6, 10, generator=g), torch.tensor([700]),
            torch.randn(1, 20, model.config.text_dim, generator=g))


# measured relative error of the DiT output against the float model (random weights): bound ~2x
TYPE_ERROR = {"Q8_0": 1.3e-3, "Q4_0": 0.022, "Q5_0": 0.012}  # measured 6.3e-4, 1.1e-2, 5.8e-3


@pytest.mark.parametrize("qtype", list(BLOCKS))
def test_gguf_file_loads_and_matches(tmp_path, qtype):
    import wanrt
    from wanrt.quant.gguf import GGUFLinear

    dim, ffn = (256, 512) if qtype.endswith("_K") else (64, 128)
    model = _model(dim, ffn)
    path = tmp_path / f"wan-{qtype}.gguf"
    held = _write_gguf(path, model, qtype)
    loaded = wanrt.load_transformer(path, device="cpu", dtype=torch.float32, backend="eager", config=model.config)
    assert isinstance(loaded.blocks[1].ffn[2], GGUFLinear) and loaded.blocks[1].ffn[2].qtype == qtype
    assert loaded.patch_embedding.weight.shape == model.patch_embedding.weight.shape
    for key, w in held.items():  # the weights it computes with are the file's, dequantized
        assert torch.equal(loaded.get_submodule(key[:-len(".weight")]).dequantized(), w), key
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        out = loaded(x, t, ctx)
        exact = dataclasses.replace(model.config)
        reference = _model(dim, ffn)
        reference.load_state_dict({**model.state_dict(), **held})  # the float model with the file's weights
        assert exact == reference.config
        torch.testing.assert_close(out, reference(x, t, ctx), rtol=1e-5, atol=1e-5)
        if qtype in TYPE_ERROR:  # against the float model it was quantized from
            ref = model(x, t, ctx)
            rel = float((out - ref).norm() / ref.norm())
            assert rel < TYPE_ERROR[qtype], rel


@pytest.mark.parametrize("float_type", [T.F16, T.BF16])
def test_gguf_half_precision_tensors_beside(tmp_path, float_type):
    import wanrt

    model = _model(64, 128)
    path = tmp_path / "wan.gguf"
    _write_gguf(path, model, "Q8_0", float_type)
    loaded = wanrt.load_transformer(path, device="cpu", dtype=torch.bfloat16, backend="eager", config=model.config)
    assert loaded.text_embedding[0].weight.dtype == torch.bfloat16
    assert loaded.head.modulation.dtype == torch.float32  # keep_fp32 stays float32
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        out, ref = loaded(x, t, ctx), model(x, t, ctx)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 6e-3, rel  # measured 2.8e-3 (Q8_0 blocks, bf16 compute)


def test_mixed_types_stream_through_block_offload_and_the_triton_dequantizer(tmp_path):
    """A Q4_K_M-like file (Q6_K for one block's FFN output, Q4_K elsewhere): blocks of different byte shapes share
    the offload slots, and the output is the resident model's bit for bit; with the Triton plan every GGUF Linear
    dequantizes in the kernel (interpreted here) and the output equals the eager plan's within float32 rounding."""
    import wanrt
    from wanrt.offload.mover import BlockMover
    from wanrt.quant.gguf import GGUFLinear

    model = _model(256, 512)
    path = tmp_path / "wan-Q4_K_M.gguf"
    _write_gguf(path, model, lambda key: "Q6_K" if key == "blocks.0.ffn.2.weight" else "Q4_K")
    kw = dict(device="cpu", dtype=torch.float32, config=model.config)
    resident = wanrt.load_transformer(path, backend="eager", **kw)
    assert resident.blocks[0].ffn[2].raw.shape != resident.blocks[1].ffn[2].raw.shape
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        ref = resident(x, t, ctx)
        streamed = wanrt.load_transformer(path, backend="eager", **kw)
        streamed.offload = BlockMover(streamed.blocks, torch.device("cpu"), 0, 2)
        assert streamed.offload.stats()["block_bytes"] == max(
            sum(b.numel() * b.element_size() for b in (*blk.parameters(), *blk.buffers()))
            for blk in resident.blocks)
        for _ in range(2):
            assert torch.equal(streamed(x, t, ctx), ref)
        fused = wanrt.load_transformer(path, backend="triton", **kw)
        layers = [m for m in fused.modules() if isinstance(m, GGUFLinear)]
        assert layers and all(m.dequant_backend == "triton" for m in layers)
        torch.testing.assert_close(fused(x, t, ctx), ref, rtol=1e-4, atol=1e-4)
        fused.set_backend("eager")
        assert all(m.dequant_backend == "eager" for m in layers)


def test_engine_detects_a_gguf_dit_in_the_checkpoint_folder(tmp_path):
    import wanrt
    from wanrt.checkpoints.tiny import cached_tiny_checkpoint

    src = cached_tiny_checkpoint("official", "tiny")
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    float_model = wanrt.load_transformer(src, device="cpu", dtype=torch.float32, backend="eager")
    for f in folder.glob("diffusion_pytorch_model*"):
        f.unlink()
    _write_gguf(folder / "wan2.1-t2v-tiny-Q8_0.gguf", float_model, "Q8_0")
    kw = dict(precision="fp32", backend="eager", prompt_cache_size=0)
    opts = dict(seed=2, num_inference_steps=3, height=48, width=80, num_frames=9)
    video = wanrt.Engine("tiny", folder, **kw).generate("a cat", progress=False, **opts)
    ref = wanrt.Engine("tiny", src, **kw).generate("a cat", progress=False, **opts)
    assert type(wanrt.Engine("tiny", folder, **kw).transformer.blocks[0].self_attn.q).__name__ == "GGUFLinear"
    assert float((video.latents - ref.latents).norm() / ref.latents.norm()) < 0.02  # Q8_0's error
    (folder / "second.gguf").write_bytes(b"")
    with pytest.raises(Exception, match="several .gguf files"):
        wanrt.Engine("tiny", folder, **kw)


def test_corrupt_and_unsupported_gguf_files_name_the_file(tmp_path):
    import wanrt
    from wanrt.checkpoints.io import CheckpointError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        wanrt.load_transformer(bad, device="cpu", dtype=torch.float32, backend="eager")
    model = _model(64, 128)
    path = tmp_path / "q8.gguf"
    _write_gguf(path, model, "Q8_0")
    with pytest.raises(ValueError, match="already quantized"):
        wanrt.load_transformer(path, device="cpu", quantization="int8", backend="eager")
    with pytest.raises(ValueError, match="disk placement streams safetensors"):
        wanrt.load_transformer(path, device="cpu", backend="eager", defer_blocks=True)


def test_a_vace_gguf_file_loads_with_its_architecture_from_the_shapes(tmp_path):
    """A VACE DiT in GGUF (main and VACE blocks quantized), read without a config: the hint stream is found from
    the keys and the output is the float model's with the file's weights."""
    import wanrt
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import WanDiT
    from wanrt.presets import get_preset
    from wanrt.quant.gguf import GGUFLinear

    cfg = dataclasses.replace(dit_config_for(get_preset("tiny-vace")), num_heads=1)  # head_dim 64: inferred as 128s
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    path = tmp_path / "wan-vace-Q8_0.gguf"
    held = _write_gguf(path, model, "Q8_0")
    assert any(k.startswith("vace_blocks.") for k in held)
    loaded = wanrt.load_transformer(path, device="cpu", dtype=torch.float32, backend="eager")
    assert loaded.config.model_type == "vace" and loaded.config.vace_layers == (0, 1)
    assert isinstance(loaded.vace_blocks[1].ffn[0], GGUFLinear)
    x, t, ctx = _inputs(model)
    vc = torch.randn(1, 96, *x.shape[2:], generator=torch.Generator().manual_seed(3))
    reference = WanDiT(cfg).eval()
    reference.load_state_dict({**model.state_dict(), **held})
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx, vace_context=vc), reference(x, t, ctx, vace_context=vc),
                                   rtol=1e-5, atol=1e-5)
