"""ONNX export of the VAE decoder step graphs, the onnxruntime decoder, and the TensorRT plumbing (CPU).

The exported graphs are checked at three levels on tiny random VAEs:

* the PyTorch step modules reproduce ``WanVAE.decode_chunk`` bitwise, frames and cache contents,
  from the first latent frame on (the 2nd frame included, where the torch cache still holds short
  or ``REPLICATE`` entries);
* the ONNX graphs on onnxruntime (CPU) give the same caches and frames up to float32 rounding;
* ``OnnxDecoder.decode`` matches ``WanVAE.decode`` (max rel err < 1e-5), streaming equals one-shot.

TensorRT is not needed: only its missing-package error, the engine cache key and the build/reuse
logic (with a fake ``tensorrt`` module) are tested.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sys
import types

import pytest
import torch

import wanrt
from wanrt.graph import onnx_vae, tensorrt_vae
from wanrt.graph.onnx_vae import (
    DecoderFirstStep,
    DecoderStep,
    OnnxDecoder,
    companion_paths,
    decoder_cache_layout,
    export_decoder_onnx,
    load_layout,
    pack_decoder_cache,
)
from wanrt.graph.tensorrt_vae import (
    TensorRTDecoder,
    build_decoder_engine,
    decoder_engine_key,
    engine_paths,
)
from wanrt.models.vae import VAEConfig, WanVAE
from wanrt.ops.backends import BackendUnavailableError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

RTOL = 1e-5  # max |ours - ref| / max |ref|
CPU = ["CPUExecutionProvider"]

TINY = {
    # Wan2.1 layout (4 stages: upsample3d, upsample3d, upsample2d), 16 latent channels, 32 cache slots.
    "wan_like": (VAEConfig(base_dim=16, num_res_blocks=2), {"batch": 1, "lh": 2, "lw": 4}),
    # 3 stages, both temporal, other latent size; batch 2.
    "small": (
        VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
                  latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.7, 2.0, 1.1)),
        {"batch": 2, "lh": 3, "lw": 5},
    ),
}


SMALL_ONLY = pytest.mark.parametrize("exported", ["small"], indirect=True)  # config-independent logic


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _latents(cfg: VAEConfig, size: dict, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size["batch"], cfg.z_dim, frames, size["lh"], size["lw"], generator=g)


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):  # one export per tiny config for the whole module
    """(config, size, WanVAE with random float32 weights, path of the exported step graph)."""
    cfg, size = TINY[request.param]
    vae = WanVAE(cfg).eval()
    _randomize_(vae, seed=1234)
    s = cfg.spatial_factor
    path = tmp_path_factory.mktemp(f"onnx-{request.param}") / "vae_decoder.onnx"
    convs = [m for m in vae.decoder.modules() if hasattr(m, "backend")]
    if convs:  # a conv backend that cannot be traced (Triton) runs eager during the export, then is restored
        convs[0].backend = "triton"
    out = export_decoder_onnx(vae, path, height=size["lh"] * s, width=size["lw"] * s, batch=size["batch"])
    assert out == path
    if convs:
        assert convs[0].backend == "triton" and all(m.backend == "eager" for m in convs[1:])
        convs[0].backend = "eager"
    return cfg, size, vae, path


@pytest.fixture(scope="module")
def decoder(exported):
    return OnnxDecoder(exported[3], providers=CPU)


# ---- PyTorch step modules: exact cache semantics -------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_step_modules_reproduce_decode_chunk_exactly(name):
    cfg, size = TINY[name]
    vae = WanVAE(cfg).eval()
    _randomize_(vae, seed=5)
    layout = decoder_cache_layout(vae)
    first, step = DecoderFirstStep(vae, layout), DecoderStep(vae, layout)
    lat = _latents(cfg, size, 3, seed=1)  # frame 2 is the first whose torch cache is fully steady
    cache = vae.new_decoder_cache()
    with torch.no_grad():
        out = ()
        for t in range(lat.shape[2]):
            ref = vae.decode_chunk(lat[:, :, t : t + 1], cache)
            out = first(lat[:, :, :1]) if t == 0 else step(lat[:, :, t : t + 1], *out[1:])
            assert out[0].dtype == torch.float32 and out[0].shape == ref.shape
            assert torch.equal(out[0], ref), f"frames differ at latent frame {t}"
            # The graph cache equals the torch cache padded to 2 frames (zeros in front / REPLICATE -> 0) ...
            packed = pack_decoder_cache(cache, layout, size["lh"], size["lw"])
            for spec, got, want in zip(layout, out[1:], packed):
                assert got.shape == want.shape == spec.shape(size["batch"], size["lh"], size["lw"])
                assert torch.equal(got, want), f"cache slot {spec.index} ({spec.module}) differs at frame {t}"
            # ... and from the 2nd latent frame on, every torch slot holds exactly 2 real frames.
            if t >= 1:
                for i in range(len(cache)):
                    assert torch.equal(cache.frames(i), out[1 + i]), f"slot {i} at frame {t}"
    # After frame 0 the torch cache really is short / REPLICATE, so the padding rule was exercised.
    cache.reset()
    vae.decode_chunk(lat[:, :, :1], cache)
    assert {cache.frames(s.index).shape[2] for s in layout if s.kind == "conv"} == {1}
    assert all(cache.frames(s.index) is None for s in layout if s.kind == "upsample3d")


def test_cache_layout_of_the_wan_layout():
    cfg, _ = TINY["wan_like"]
    vae = WanVAE(cfg)
    layout = decoder_cache_layout(vae)
    assert len(layout) == vae.decoder.num_cache_slots == 32  # as the real Wan2.1 decoder
    assert [s.index for s in layout] == list(range(32))
    up = [s for s in layout if s.kind == "upsample3d"]
    assert [(s.module, s.channels, s.scale) for s in up] == [("decoder.upsamples.3", 64, 1), ("decoder.upsamples.7", 64, 2)]
    assert (layout[0].module, layout[0].channels, layout[0].scale) == ("decoder.conv1", 16, 1)
    assert (layout[-1].module, layout[-1].channels, layout[-1].scale) == ("decoder.head.2", 16, 8)
    assert layout[-1].shape(2, 3, 5) == (2, 16, 2, 24, 40)
    with torch.device("meta"):
        meta = WanVAE(cfg)
    with pytest.raises(ValueError, match="meta"):
        decoder_cache_layout(meta)


def test_pack_decoder_cache_needs_a_started_cache():
    cfg, size = TINY["small"]
    vae = WanVAE(cfg)
    with pytest.raises(ValueError, match="first latent frame"):
        pack_decoder_cache(vae.new_decoder_cache(), decoder_cache_layout(vae), size["lh"], size["lw"])


# ---- ONNX graphs on onnxruntime ----------------------------------------------------------------


def test_onnx_graphs_match_torch_step_modules(exported):
    cfg, size, vae, path = exported
    first_path, _ = companion_paths(path)
    first_s = ort.InferenceSession(str(first_path), providers=CPU)
    step_s = ort.InferenceSession(str(path), providers=CPU)
    layout = decoder_cache_layout(vae)
    n = len(layout)
    assert [i.name for i in first_s.get_inputs()] == ["z"]
    assert [i.name for i in step_s.get_inputs()] == ["z", *(f"cache_in_{i}" for i in range(n))]
    assert [o.name for o in step_s.get_outputs()] == ["frames", *(f"cache_out_{i}" for i in range(n))]
    assert [o.name for o in first_s.get_outputs()] == ["frames", *(f"cache_out_{i}" for i in range(n))]
    first, step = DecoderFirstStep(vae, layout), DecoderStep(vae, layout)
    lat = _latents(cfg, size, 3, seed=2)
    with torch.no_grad():
        ref = first(lat[:, :, :1])
        got = first_s.run(None, {"z": lat[:, :, :1].numpy()})
        for t in range(1, 3):
            for i, (a, b) in enumerate(zip(got, ref)):
                assert a.shape == tuple(b.shape), (t, i)
                assert _rel_err(torch.from_numpy(a), b) < RTOL, f"output {i} before latent frame {t}"
            feeds = {"z": lat[:, :, t : t + 1].numpy(), **{f"cache_in_{i}": got[1 + i] for i in range(n)}}
            got = step_s.run(None, feeds)
            ref = step(lat[:, :, t : t + 1], *ref[1:])  # each side runs on its own cache
        assert got[0].shape == (size["batch"], 3, cfg.temporal_factor, size["lh"] * cfg.spatial_factor,
                                size["lw"] * cfg.spatial_factor)
        assert all(_rel_err(torch.from_numpy(a), b) < RTOL for a, b in zip(got, ref))


@pytest.mark.parametrize("frames", [4, 1])
def test_onnx_decoder_matches_wanvae_decode(exported, decoder, frames):
    cfg, size, vae, _ = exported
    dec = decoder
    assert dec.providers == CPU
    assert (dec.batch, dec.latent_height, dec.latent_width, dec.z_dim) == (size["batch"], size["lh"], size["lw"],
                                                                            cfg.z_dim)
    lat = _latents(cfg, size, frames, seed=frames)
    video = dec.decode(lat)
    ref = vae.decode(lat)
    assert video.shape == ref.shape == (size["batch"], 3, 1 + cfg.temporal_factor * (frames - 1),
                                        size["lh"] * cfg.spatial_factor, size["lw"] * cfg.spatial_factor)
    assert video.dtype == torch.float32 and video.device == lat.device
    assert video.min() >= -1 and video.max() <= 1
    assert _rel_err(video, ref) < RTOL
    assert (ref.abs() < 1).float().mean() > 0.5  # meaningful only if most pixels are not clamped
    if frames == 1:  # any float dtype in, float32 out (the graph takes float32 z)
        assert _rel_err(dec.decode(lat.double()), ref) < RTOL


def test_streaming_equals_one_shot(exported, decoder):
    cfg, size, _, _ = exported
    dec = decoder
    lat = _latents(cfg, size, 3, seed=9)
    chunks = list(dec.decode_stream(lat))
    assert [c.shape[2] for c in chunks] == [1, cfg.temporal_factor, cfg.temporal_factor]
    assert all(c.dtype == torch.float32 and c.shape[0] == size["batch"] for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=2), dec.decode(lat))
    # A decoder is reusable: a second decode starts from a fresh first step.
    assert torch.equal(dec.decode(lat), dec.decode(lat))


# ---- sidecar / metadata ------------------------------------------------------------------------


def _shape(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_sidecar_and_metadata_describe_the_cache(exported):
    cfg, size, vae, path = exported
    first_path, sidecar = companion_paths(path)
    assert first_path.name == "vae_decoder.first.onnx" and sidecar.name == "vae_decoder.json"
    info = load_layout(path)
    assert json.loads(sidecar.read_text()) == info
    assert info["format"] == onnx_vae.FORMAT and info["format_version"] == onnx_vae.FORMAT_VERSION
    assert info["wanrt_version"] == wanrt.__version__
    s = cfg.spatial_factor
    assert (info["batch"], info["height"], info["width"]) == (size["batch"], size["lh"] * s, size["lw"] * s)
    assert (info["latent_height"], info["latent_width"], info["z_dim"]) == (size["lh"], size["lw"], cfg.z_dim)
    assert (info["dtype"], info["cache_frames"], info["temporal_factor"]) == ("float32", 2, cfg.temporal_factor)
    assert (info["step_file"], info["first_step_file"]) == (path.name, first_path.name)
    assert VAEConfig(**info["vae_config"]) == cfg
    layout = decoder_cache_layout(vae)
    assert len(info["cache"]) == len(layout)
    for entry, spec in zip(info["cache"], layout):
        assert entry["index"] == spec.index and entry["module"] == spec.module and entry["kind"] == spec.kind
        assert entry["shape"] == list(spec.shape(size["batch"], size["lh"], size["lw"]))
        assert (entry["input"], entry["output"], entry["dtype"]) == (f"cache_in_{spec.index}",
                                                                     f"cache_out_{spec.index}", "float32")
    for p in (path, first_path):
        assert info["files"][p.name] == {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    step_m, first_m = onnx.load(str(path)), onnx.load(str(first_path))
    for model, part in ((step_m, "step"), (first_m, "first_step")):
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 17
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["wanrt"]) == {k: v for k, v in info.items() if k != "files"}
        # Every declared input/output has the sidecar's static shape.
        for values, key in ((model.graph.input, "inputs"), (model.graph.output, "outputs")):
            assert [(v.name, _shape(v)) for v in values] == [(d["name"], d["shape"]) for d in info[part][key]]
        # No output is a constant (TensorRT's ONNX parser rejects those): all depend on the inputs.
        reached = {i.name for i in model.graph.input}
        for node in model.graph.node:  # topologically sorted
            if any(i in reached for i in node.input):
                reached.update(node.output)
        assert all(o.name in reached for o in model.graph.output), part
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_fp16_export_keeps_the_callers_model(tmp_path):
    cfg, _ = TINY["small"]
    vae = WanVAE(cfg).eval()
    _randomize_(vae, seed=3)
    path = export_decoder_onnx(vae, tmp_path / "sub" / "d16.onnx", height=12, width=20, dtype=torch.float16)
    assert vae.dtype == torch.float32
    info = load_layout(path)
    assert info["dtype"] == "float16" and {c["dtype"] for c in info["cache"]} == {"float16"}
    model = onnx.load(str(path))
    types_ = {i.name: i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)}
    assert types_["z"] == types_["frames"] == onnx.TensorProto.FLOAT
    assert types_["cache_in_0"] == types_["cache_out_0"] == onnx.TensorProto.FLOAT16


# ---- errors ------------------------------------------------------------------------------------


def test_errors(exported, decoder, tmp_path):
    cfg, size, vae, path = exported
    dec = decoder
    b, lh, lw = size["batch"], size["lh"], size["lw"]
    with pytest.raises(ValueError, match=rf"exported for latents \[{b}, {cfg.z_dim}, T, {lh}, {lw}\]"):
        dec.decode(torch.zeros(b, cfg.z_dim, 2, lh + 1, lw))
    with pytest.raises(ValueError, match="exported for"):
        dec.decode_stream(torch.zeros(b + 1, cfg.z_dim, 2, lh, lw))  # raised by the call, not on next()
    for bad in (torch.zeros(b, cfg.z_dim + 1, 2, lh, lw), torch.zeros(b, cfg.z_dim, lh, lw),
                torch.zeros(b, cfg.z_dim, 2, lh, lw, dtype=torch.int64), torch.zeros(b, cfg.z_dim, 0, lh, lw)):
        with pytest.raises(ValueError):
            dec.decode(bad)
    with pytest.raises(ValueError):
        dec.decode(lh)
    # Export arguments.
    s = cfg.spatial_factor
    for kwargs in ({"height": s * 3 + 1, "width": s * 2}, {"height": 0, "width": s},
                   {"height": s, "width": s, "batch": 0}, {"height": s, "width": s, "opset": 13},
                   {"height": s, "width": s, "dtype": torch.bfloat16}):
        with pytest.raises(ValueError):
            export_decoder_onnx(vae, tmp_path / "bad.onnx", **kwargs)
    assert not (tmp_path / "bad.onnx").exists()
    # Missing, foreign or inconsistent files.
    with pytest.raises(FileNotFoundError, match="first"):
        OnnxDecoder(tmp_path / "missing.onnx")
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    first_path, sidecar = companion_paths(path)
    for p in (path, first_path, sidecar):
        (copy_dir / p.name).write_bytes(p.read_bytes())
    copied = copy_dir / path.name
    OnnxDecoder(copied, providers=CPU)
    (copy_dir / first_path.name).write_bytes(first_path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="bytes"):
        OnnxDecoder(copied, providers=CPU)
    (copy_dir / sidecar.name).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a wanrt"):
        load_layout(copied)
    info = load_layout(path)
    (copy_dir / sidecar.name).write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_layout(copied)


# ---- TensorRT (no TensorRT here) ----------------------------------------------------------------


@SMALL_ONLY
def test_tensorrt_missing_raises_with_install_hint(exported, monkeypatch):
    _, _, _, path = exported
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    for call in (lambda: build_decoder_engine(path), lambda: TensorRTDecoder(path.with_suffix(".engine"))):
        with pytest.raises(BackendUnavailableError, match=r"pip install 'wanrt\[trt\]'"):
            call()


@SMALL_ONLY
def test_engine_key_is_pure_and_sensitive(exported):
    _, _, _, path = exported
    info = load_layout(path)
    base = {"trt_version": "10.9.0", "gpu_name": "NVIDIA H100 (sm_90)", "fp16": True}
    key = decoder_engine_key(info, **base)
    assert len(key) == 16 and int(key, 16) >= 0
    assert decoder_engine_key(json.loads(json.dumps(info)), **base) == key  # deterministic
    assert decoder_engine_key({**info, "wanrt_version": "9.9", "torch_version": "x"}, **base) == key
    changed = [
        decoder_engine_key(info, **{**base, "trt_version": "10.10.0"}),
        decoder_engine_key(info, **{**base, "gpu_name": "NVIDIA L4 (sm_89)"}),
        decoder_engine_key(info, **{**base, "fp16": False}),
    ]
    bigger = json.loads(json.dumps(info))
    bigger["step"]["inputs"][0]["shape"][-1] += 1
    changed.append(decoder_engine_key(bigger, **base))
    reweighted = json.loads(json.dumps(info))
    next(iter(reweighted["files"].values()))["sha256"] = "0" * 64
    changed.append(decoder_engine_key(reweighted, **base))
    assert len({key, *changed}) == len(changed) + 1
    # An fp16 ONNX builds strongly typed: the fp16 flag does not matter.
    half = {**info, "dtype": "float16"}
    assert decoder_engine_key(half, **base) == decoder_engine_key(half, **{**base, "fp16": False}) != key
    engine, first, sidecar = engine_paths(path, key, "build/trt")
    assert (str(engine), str(first), str(sidecar)) == (
        f"build/trt/vae_decoder-{key}.engine", f"build/trt/vae_decoder-{key}.first.engine",
        f"build/trt/vae_decoder-{key}.json")


class _FakeTensorRT(types.SimpleNamespace):
    """Just enough of the TensorRT 10 builder API to run build_decoder_engine's control flow."""

    def __init__(self, builds: list) -> None:
        ns = types.SimpleNamespace
        fake = self

        class Layer:
            def __init__(self, name, dtype="trt.float32"):
                self.name, self.precision, self.num_outputs, self.out_types = name, None, 1, {}
                self.dtype = dtype

            def get_output(self, j):
                return types.SimpleNamespace(dtype=self.dtype)

            def set_output_type(self, j, dtype):
                self.out_types[j] = dtype

        class Network:
            def __init__(self, flags):
                self.flags = flags
                self.layers = [Layer("/decoder/head.0/ReduceL2"), Layer("/decoder/head.0/Div"),
                               Layer("/decoder/head.0/Shape", dtype="trt.int64"), Layer("/decoder/head.2/Conv")]
                self.num_layers = len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

        class Config:
            def __init__(self):
                self.flags, self.pools = set(), {}

            def set_flag(self, flag):
                self.flags.add(flag)

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                fake.builds.append((network, config))
                return f"engine-{len(fake.builds)}".encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse_from_file(self, path):
                fake.parsed.append(path)
                return True

        super().__init__(
            __version__="10.99.0", builds=builds, parsed=[], Builder=Builder, OnnxParser=OnnxParser,
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None}),
            NetworkDefinitionCreationFlag=ns(STRONGLY_TYPED=5), MemoryPoolType=ns(WORKSPACE="workspace"),
            BuilderFlag=ns(FP16="fp16", PREFER_PRECISION_CONSTRAINTS="prefer"), float32="trt.float32",
            float16="trt.float16",
        )


@SMALL_ONLY
def test_engine_build_and_reuse_with_a_fake_tensorrt(exported, monkeypatch, tmp_path):
    _, _, _, path = exported
    fake = _FakeTensorRT(builds=[])
    monkeypatch.setattr(tensorrt_vae, "_import_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_vae, "_gpu_name", lambda device=None: "Fake GPU (sm_90)")
    cache_dir = tmp_path / "trt"
    engine = build_decoder_engine(path, cache_dir, fp16=True, workspace_gb=1)
    key = decoder_engine_key(load_layout(path), trt_version="10.99.0", gpu_name="Fake GPU (sm_90)", fp16=True)
    assert engine == engine_paths(path, key, cache_dir)[0]
    first, _ = companion_paths(engine)
    assert engine.read_bytes() == b"engine-2" and first.read_bytes() == b"engine-1"  # first-step graph built first
    assert fake.parsed == [str(companion_paths(path)[0]), str(path)]
    network, config = fake.builds[-1]
    assert network.flags == 0 and config.flags == {"fp16", "prefer"} and config.pools == {"workspace": 1 << 30}
    norm, div, shape, conv = network.layers
    assert norm.precision == div.precision == "trt.float32" and div.out_types == {0: "trt.float32"}  # norms fp32
    assert shape.precision is None and conv.precision is None  # not shape computations, not the rest
    info = load_layout(engine)  # the engine sidecar is a valid layout for TensorRTDecoder
    assert (info["step_file"], info["first_step_file"]) == (engine.name, first.name)
    assert info["engine"]["key"] == key and info["engine"]["precision"] == "fp16"
    assert info["cache"] == load_layout(path)["cache"]
    assert info["files"][engine.name]["bytes"] == len(b"engine-2")
    # Reused when present: nothing is built again.
    assert build_decoder_engine(path, cache_dir, fp16=True) == engine and len(fake.builds) == 2
    # A different precision is another key; force rebuilds the same key.
    engine32 = build_decoder_engine(path, cache_dir, fp16=False)
    assert engine32 != engine and len(fake.builds) == 4 and fake.builds[-1][1].flags == set()
    build_decoder_engine(path, cache_dir, fp16=True, force=True)
    assert len(fake.builds) == 6


@SMALL_ONLY
def test_engine_reused_without_building(exported, monkeypatch, tmp_path):
    _, _, _, path = exported
    fake = _FakeTensorRT(builds=[])

    def no_builder(logger):
        raise AssertionError("must not build")

    fake.Builder = no_builder
    monkeypatch.setattr(tensorrt_vae, "_import_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_vae, "_gpu_name", lambda device=None: "Fake GPU (sm_90)")
    key = decoder_engine_key(load_layout(path), trt_version=fake.__version__, gpu_name="Fake GPU (sm_90)", fp16=True)
    engine, first, sidecar = engine_paths(path, key, tmp_path)
    for p in (engine, first, sidecar):
        p.write_text("x")
    assert build_decoder_engine(path, tmp_path) == engine
    sidecar.unlink()  # an incomplete set is rebuilt
    with pytest.raises(AssertionError, match="must not build"):
        build_decoder_engine(path, tmp_path)


@SMALL_ONLY
def test_tensorrt_decoder_orchestration_with_fake_engines(exported, monkeypatch, tmp_path):
    """TensorRTDecoder's buffers, I/O names and cache ping-pong, with the torch step modules as 'engines'."""
    cfg, size, vae, path = exported
    fake = _FakeTensorRT(builds=[])
    fake.Runtime = lambda logger: "runtime"
    monkeypatch.setattr(tensorrt_vae, "_import_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_vae, "_gpu_name", lambda device=None: "Fake GPU (sm_90)")
    engine = build_decoder_engine(path, tmp_path)
    layout = decoder_cache_layout(vae)
    calls = []

    class Runner:  # stands in for _EngineRunner: same attributes, runs the PyTorch step modules
        def __init__(self, trt, runtime, engine_path):
            info = load_layout(engine)
            self.first = engine_path.name.endswith(".first.engine")
            part = info["first_step" if self.first else "step"]
            self.inputs = {d["name"]: (tuple(d["shape"]), torch.float32) for d in part["inputs"]}
            self.outputs = {d["name"]: (tuple(d["shape"]), torch.float32) for d in part["outputs"]}
            self.module = (DecoderFirstStep if self.first else DecoderStep)(vae, layout)

        def run(self, io, stream):
            cache_in = [io[name] for name in self.inputs if name != "z"]
            with torch.no_grad():
                outs = self.module(io["z"].clone(), *cache_in)
            for name, value in zip(self.outputs, outs):
                io[name].copy_(value)
            calls.append(([t.data_ptr() for t in cache_in], [io[n].data_ptr() for n in self.outputs if n != "frames"]))

    class Stream:
        cuda_stream = 0

        def wait_stream(self, other):
            pass

    class CpuCuda:
        available = staticmethod(lambda: True)
        device_scope = staticmethod(lambda device: contextlib.nullcontext())
        new_stream = current_stream = staticmethod(lambda device: Stream())

    monkeypatch.setattr(tensorrt_vae, "_EngineRunner", Runner)
    monkeypatch.setattr(tensorrt_vae, "_Cuda", CpuCuda)
    dec = TensorRTDecoder(engine, device="cpu")
    assert (dec.batch, dec.latent_height, dec.latent_width) == (size["batch"], size["lh"], size["lw"])
    lat = _latents(cfg, size, 4, seed=4)
    video = dec.decode(lat)
    cache = vae.new_decoder_cache()
    assert torch.equal(video, torch.cat([vae.decode_chunk(lat[:, :, t : t + 1], cache) for t in range(4)], 2))
    assert _rel_err(video, vae.decode(lat)) < RTOL  # decode's conv2 over all frames may round differently
    # First step writes set A; then each step reads the set the previous one wrote and writes the other.
    assert len(calls) == 4 and calls[0][0] == []
    for (_, prev_out), (cur_in, cur_out) in itertools.pairwise(calls):
        assert cur_in == prev_out and not set(cur_in) & set(cur_out)
    chunks = list(dec.decode_stream(lat))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4] and torch.equal(torch.cat(chunks, 2), video)
    assert chunks[1].data_ptr() != chunks[2].data_ptr()  # fresh tensors, not the reused frame buffer
    with pytest.raises(ValueError, match="exported for"):
        dec.decode(lat[:, :, :, :-1])
