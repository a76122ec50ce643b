"""The public Engine API on the tiny model: validation, seeds, outputs, failure handling."""

import numpy as np
import pytest
import torch

import wanrt
from wanrt.engine import GenerationError

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3, progress=False)


def test_generate_outputs(tiny_engine):
    steps = []
    v = tiny_engine.generate("a corgi surfing a wave", seed=7,
                             callback=lambda i, n, x: steps.append((i, n, x.shape)), **SMALL)
    assert isinstance(v, wanrt.Video)
    assert v.frames.dtype == np.uint8 and v.frames.shape == (5, 32, 48, 3)
    assert v.fps == 16 and v.seed == 7
    assert v.latents.shape == (1, 16, 2, 4, 6) and v.latents.dtype == torch.float32
    assert set(v.timings) >= {"text_encoder", "denoise", "vae_decode", "total"}
    assert all(t >= 0 for t in v.timings.values())
    assert [s[0] for s in steps] == [0, 1, 2] and steps[0][1] == 3 and steps[0][2] == (1, 16, 2, 4, 6)
    assert v.frames.std() > 0  # not a blank video


def test_same_seed_same_video_other_seed_differs(tiny_engine):
    a = tiny_engine.generate("a cat", seed=1, **SMALL)
    b = tiny_engine.generate("a cat", seed=1, **SMALL)
    c = tiny_engine.generate("a cat", seed=2, **SMALL)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert not torch.equal(a.latents, c.latents)


def test_random_seed_is_reported_and_reproduces(tiny_engine):
    a = tiny_engine.generate("a cat", **SMALL)
    assert isinstance(a.seed, int) and 0 <= a.seed < 2**63
    b = tiny_engine.generate("a cat", seed=a.seed, **SMALL)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_prompt_embeds_equal_prompt(tiny_engine):
    emb = tiny_engine.encode_prompt(["a red fox", tiny_engine.preset.negative_prompt])
    a = tiny_engine.generate("a red fox", seed=3, **SMALL)
    b = tiny_engine.generate(prompt_embeds=emb[0][None], seed=3, **SMALL)
    c = tiny_engine.generate(prompt_embeds=emb[0][None], negative_prompt_embeds=emb[1][None], seed=3, **SMALL)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.latents, c.latents, rtol=0, atol=0)
    d = tiny_engine.generate("a red fox", negative_prompt="blurry", seed=3, **SMALL)
    assert not torch.equal(a.latents, d.latents)


def test_latents_argument_and_solvers(tiny_engine):
    noise = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    a = tiny_engine.generate("x", latents=noise, seed=0, **SMALL)
    b = tiny_engine.generate("x", latents=noise, seed=99, **SMALL)  # latents override the seed's noise
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    for solver in ("dpm++", "euler"):
        c = tiny_engine.generate("x", latents=noise, sample_solver=solver, **SMALL)
        assert torch.isfinite(c.latents).all() and not torch.equal(c.latents, a.latents)


def test_guidance_one_skips_negative_pass(tiny_engine, monkeypatch):
    calls = []
    orig = tiny_engine.transformer.run_blocks  # the blocks: the work of one DiT pass
    monkeypatch.setattr(tiny_engine.transformer, "run_blocks", lambda inp: calls.append(1) or orig(inp))
    tiny_engine.generate("x", seed=0, guidance_scale=1.0, **SMALL)
    assert len(calls) == 3
    calls.clear()
    tiny_engine.generate("x", seed=0, guidance_scale=5.0, **SMALL)
    assert len(calls) == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=30), "height must be a positive multiple of 16"),
        (dict(width=40), "width must be a positive multiple of 16"),
        (dict(height=0), "height"),
        (dict(num_frames=6), "num_frames must be 4k\\+1"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_inference_steps=0), "num_inference_steps must be an int in 1..1000"),
        (dict(num_inference_steps=100_000_000), "num_inference_steps must be an int in 1..1000"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (dict(shift=float("nan")), "shift must be a finite number"),
        (dict(teacache_threshold=float("nan")), "teacache_threshold must be a finite number"),
        (dict(num_frames=25001), "num_frames 25001 is beyond what the model can address: at most 4093 frames"),
        (dict(height=2**20, width=2**20), "height 1048576 is beyond what the model can address: at most 16384 px"),
        (dict(height=16384, width=16384, num_frames=81), "needs about .* GiB beyond the weights, but cpu has"),
        (dict(sample_solver="ddim"), "sample_solver must be one of"),
        (dict(shift=0.0), "shift must be > 0"),
        (dict(seed=-1), "seed must be an int"),
    ],
)
def test_invalid_arguments(tiny_engine, kwargs, match):
    args = dict(SMALL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_engine.generate("a cat", **args)


def test_invalid_prompts_and_embeddings(tiny_engine):
    d = tiny_engine.transformer.config.text_dim
    with pytest.raises(ValueError, match="give a prompt or prompt_embeds"):
        tiny_engine.generate(**SMALL)
    with pytest.raises(ValueError, match="not both"):
        tiny_engine.generate("x", prompt_embeds=torch.randn(1, 4, d), **SMALL)
    with pytest.raises(ValueError, match=f"width {d + 1}.*text_dim is {d}"):
        tiny_engine.generate(prompt_embeds=torch.randn(1, 4, d + 1), **SMALL)
    with pytest.raises(ValueError, match="negative_prompt_embeds has width 3"):
        tiny_engine.generate("x", negative_prompt_embeds=torch.randn(1, 4, 3), **SMALL)
    with pytest.raises(ValueError, match="tokens"):
        tiny_engine.generate(prompt_embeds=torch.randn(1, 10_000, d), **SMALL)
    with pytest.raises(ValueError, match="NaN"):
        tiny_engine.generate(prompt_embeds=torch.full((1, 4, d), float("nan")), **SMALL)
    with pytest.raises(ValueError, match="latents must have shape"):
        tiny_engine.generate("x", latents=torch.randn(1, 16, 3, 4, 6), **SMALL)


def test_bad_engine_arguments(tiny_official):
    with pytest.raises(ValueError, match="unknown model preset"):
        wanrt.Engine("t2v-2b", tiny_official)
    with pytest.raises(ValueError, match="precision must be one of"):
        wanrt.Engine("tiny", tiny_official, device="cpu", precision="int3")
    with pytest.raises(ValueError, match="backend must be one of"):
        wanrt.Engine("tiny", tiny_official, device="cpu", backend="magic")
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        wanrt.Engine("t2v-14b")
    with pytest.raises(ValueError, match=r"does not match preset 't2v-1.3b'.*dim.*matches preset\(s\) \['tiny'\]"):
        wanrt.Engine("t2v-1.3b", tiny_official, device="cpu")


def test_from_pretrained_infers_tiny(tiny_diffusers):
    e = wanrt.Engine.from_pretrained(tiny_diffusers, device="cpu", precision="bf16")
    assert e.preset.name == "tiny"
    v = e.generate("a cat", seed=0, **SMALL)
    assert v.frames.shape == (5, 32, 48, 3)


def test_nan_in_dit_is_reported_with_step(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.transformer, "run_blocks",
                        lambda inp: (torch.full_like(inp.x, float("nan"), dtype=torch.float32), None))
    with pytest.raises(FloatingPointError, match="step 0"):
        tiny_engine.generate("x", seed=0, **SMALL)


def test_decode_failure_keeps_latents(tiny_engine, monkeypatch):
    ok = tiny_engine.generate("x", seed=4, **SMALL)

    real = tiny_engine.vae.decode_stream

    def boom(z):  # the first chunk decodes, then the device runs out of memory
        stream = real(z)
        yield next(stream)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(tiny_engine.vae, "decode_stream", boom)
    with pytest.raises(GenerationError, match="after 1 frames .*out of memory") as e:
        tiny_engine.generate("x", seed=4, **SMALL)
    torch.testing.assert_close(e.value.latents, ok.latents, rtol=0, atol=0)
    assert e.value.seed == 4
    monkeypatch.undo()
    video = tiny_engine.decode(e.value.latents)
    assert video.shape == (1, 3, 5, 32, 48)


def test_tiny_engine_without_checkpoint_uses_the_packaged_model_or_the_cache(tmp_path, monkeypatch):
    """``tiny`` loads the trained model shipped in the package (nothing written); the random tiny presets and a
    source tree without the trained weights write a random checkpoint to the cache once and reuse it."""
    from wanrt.checkpoints import tiny as tiny_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    e = wanrt.Engine("tiny", device="cpu", precision="fp32")
    assert e.checkpoint_dir == tiny_mod.TRAINED_TINY and not (tmp_path / "wanrt").exists()
    assert e.transformer.config.num_layers == 4
    v = e.generate("a corgi", seed=7, progress=False)  # the preset defaults: 64x96, 9 frames, 4 steps
    assert v.frames.shape == (9, 64, 96, 3)
    monkeypatch.setattr(tiny_mod, "TRAINED_TINY", tmp_path / "not-installed")
    e = wanrt.Engine("tiny", device="cpu", precision="fp32")
    assert (tmp_path / "wanrt").is_dir() and str(e.checkpoint_dir).startswith(str(tmp_path))
    assert e.transformer.config.num_layers == 2  # the random fixture size
    e2 = wanrt.Engine("tiny", device="cpu", precision="fp32")  # reuses the cached checkpoint
    assert e2.checkpoint_dir == e.checkpoint_dir


@pytest.mark.parametrize("precision, dit_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_close_to_fp32(tiny_official, tiny_engine, precision, dit_dtype):
    """bf16/fp16 weights (fp32 modulation, time MLP, head, norms) stay close to the fp32 reference."""
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision=precision)
    assert e.transformer.blocks[0].self_attn.q.weight.dtype == dit_dtype
    assert e.transformer.blocks[0].modulation.dtype == torch.float32
    assert next(e.text_encoder.model.parameters()).dtype == torch.bfloat16  # UMT5 overflows in fp16
    assert next(e.vae.parameters()).dtype == torch.float32  # the official VAE runs in fp32
    ref = tiny_engine.generate("a cat", seed=3, **SMALL).latents
    got = e.generate("a cat", seed=3, **SMALL).latents
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 3e-2


# ------------------------------------------------------------------------------ caches and early validation


def test_the_test_session_writes_no_user_cache():
    """tests/conftest.py points wanrt's and Triton's caches at a temporary folder for the whole session."""
    import os
    from pathlib import Path

    from conftest import session_cache_dir

    from wanrt.checkpoints.tiny import cache_dir

    root = Path(session_cache_dir()).resolve()
    assert root != Path.home().resolve() and root.is_dir()
    assert root in cache_dir().resolve().parents
    assert root in Path(os.environ["TRITON_CACHE_DIR"]).resolve().parents
    assert root in Path(os.environ["TRITON_HOME"]).resolve().parents


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(teacache_threshold=-0.1), ValueError, "teacache_threshold"),
    (dict(precision="fp4"), ValueError, "precision must be one of"),
    (dict(vae_backend="tensorrt"), RuntimeError, "tensorrt|CUDA"),
    (dict(backend="flash-attn"), RuntimeError, r"wanrt\[flash\]"),
    (dict(image_cache_size=-1), ValueError, "image_cache_size"),
])
def test_engine_options_are_checked_before_the_tiny_checkpoint_is_written(tmp_path, monkeypatch, kwargs, error,
                                                                          match):
    from wanrt.checkpoints.tiny import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "wanrt"  # where a valid request would write the tiny checkpoint
    with pytest.raises(error, match=match):
        wanrt.Engine("tiny", device="cpu", **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing written: no checkpoint, no half-written folder


def test_requests_are_judged_before_any_work(tiny_engine, monkeypatch):
    """Every bad request is refused before the text encoder, a DiT step or an allocation of its size."""
    def fail(*a, **k):
        pytest.fail("work started for a bad request")

    monkeypatch.setattr(tiny_engine.text, "encode", fail)
    monkeypatch.setattr(tiny_engine.transformer, "prepare", fail)
    for bad in (dict(num_inference_steps=100_000_000), dict(height=16384, width=16384, num_frames=81),
                dict(guidance_scale=float("nan")), dict(num_frames=25001)):
        with pytest.raises(ValueError):
            tiny_engine.generate("a cat", **{**SMALL, **bad})


def test_memory_estimate_is_refused_with_the_numbers():
    from wanrt.presets import get_preset
    from wanrt.request import RequestTooLarge, check_fits, estimate_memory, resolve_request

    p = get_preset("t2v-14b")
    ok = resolve_request(p, "a cat", seed=1)  # 480x832, 81 frames
    big = resolve_request(p, "a cat", seed=1, height=16384, width=16384)
    assert estimate_memory(big, p) > 100 * estimate_memory(ok, p) > 2**30  # 5.2 TB against 10 GB
    with pytest.raises(RequestTooLarge) as err:
        check_fits(big, p, "cpu")
    assert err.value.needed > err.value.capacity > 0
    assert "16384x16384" in str(err.value) and "GiB" in str(err.value)


def test_memory_estimate_divides_the_dit_activations_over_sequence_parallel_ranks():
    from wanrt.presets import get_preset
    from wanrt.request import _dit_forward_bytes, estimate_memory, resolve_request

    p = get_preset("t2v-14b")
    req = resolve_request(p, "a cat", seed=1, height=720, width=1280)  # 75,600 tokens
    one, eight = _dit_forward_bytes(req, p, 2), _dit_forward_bytes(req, p, 2, 8)
    assert one > 8 * eight * 0.999 and eight * 8 >= one  # ceil(S / 8) tokens per rank
    assert estimate_memory(req, p) - estimate_memory(req, p, sequence_parallel=8) == one - eight
