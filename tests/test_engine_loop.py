"""The fast denoising loop and the embeddable Engine: batched CFG, TeaCache, CUDA-graph replay (with a CPU
stand-in capturer), cancellation, the prompt cache, thread safety, warm-up and flat memory."""

from __future__ import annotations

import threading

import pytest
import torch
from test_cuda_graphs import FakeCapturer

import wanrt
from wanrt.sampling.loop import make_step_graphs
from wanrt.testing import Tolerance, assert_close

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=8, progress=False)  # TeaCache needs 8
FP32_LOOP = Tolerance(atol=1e-4, rtol=1e-4, rel=2e-5)
# A polynomial that makes the tiny random model skip steps (its time embedding changes by rel ~1 per step
# at 6-8 steps): rescaled change = 0.1 * rel, so a threshold of 0.25 skips about every other step.
COEFS = (0.0, 0.0, 0.0, 0.1, 0.0)


@pytest.fixture(scope="module")
def engine(tiny_official):
    return wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa")


@pytest.fixture(scope="module")
def reference(engine):
    return engine.generate("a corgi", seed=3, **SMALL)


def test_cpu_defaults_are_the_reference_loop(engine, reference):
    assert engine.config.use_cfg_batch is False and engine.config.use_cuda_graphs is False
    assert reference.stats["cfg_batched"] is False and reference.stats["cuda_graphs"] is None
    assert "teacache" not in reference.stats and reference.stats["steps"] == SMALL["num_inference_steps"]


def test_batched_cfg_equals_two_passes(tiny_official, reference, monkeypatch):
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", cfg_batch=True)
    batches = []
    orig = e.transformer.run_blocks
    monkeypatch.setattr(e.transformer, "run_blocks", lambda inp: batches.append(inp.x.shape[0]) or orig(inp))
    v = e.generate("a corgi", seed=3, **SMALL)
    assert v.stats["cfg_batched"] is True and batches == [2] * SMALL["num_inference_steps"]  # one batch-2 pass per step
    assert_close(v.latents, reference.latents, name="batched CFG latents", tol=FP32_LOOP)
    batches.clear()
    e.generate("a corgi", seed=3, guidance_scale=1.0, **SMALL)
    assert batches == [1] * SMALL["num_inference_steps"]  # guidance 1: no unconditional branch at all


def test_teacache_threshold_zero_is_exact(engine, reference):
    v = engine.generate("a corgi", seed=3, teacache_threshold=0.0, teacache_coefficients=COEFS, **SMALL)
    assert torch.equal(v.latents, reference.latents)
    assert "teacache" not in v.stats


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_teacache_skips_steps_and_reports_them(tiny_official, reference, cfg_batch, monkeypatch):
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", cfg_batch=cfg_batch)
    calls = []
    orig = e.transformer.run_blocks
    monkeypatch.setattr(e.transformer, "run_blocks", lambda inp: calls.append(inp.x.shape[0]) or orig(inp))
    v = e.generate("a corgi", seed=3, teacache_threshold=0.25, teacache_coefficients=COEFS, **SMALL)
    tc = v.stats["teacache"]
    assert set(tc) == {"cond", "uncond"}
    for branch in tc.values():
        assert branch["computed"] + branch["skipped"] == SMALL["num_inference_steps"]
        assert branch["skipped"] >= 1 and branch["computed"] >= 2  # first and last always compute
    assert sum(calls) == tc["cond"]["computed"] + tc["uncond"]["computed"]  # skipped steps ran no block
    assert torch.isfinite(v.latents).all()
    rel = ((v.latents - reference.latents).norm() / reference.latents.norm()).item()
    # An approximation of the uncached video, not a different one: measured 0.0348 at 8 steps (both cfg_batch
    # settings, CPU fp32); the bounds are 0.5x and 1.5x that. Dropping the cached residual on skipped steps gives
    # 0.139 and fails here.
    assert 0.017 < rel < 0.052, rel


def test_teacache_errors(engine):
    with pytest.raises(ValueError, match="no TeaCache coefficients for preset 'tiny'"):
        engine.generate("a corgi", seed=3, teacache_threshold=0.1, **SMALL)
    with pytest.raises(ValueError, match="teacache_mode"):
        engine.generate("a corgi", seed=3, teacache_threshold=0.1, teacache_mode="x", **SMALL)
    with pytest.raises(ValueError, match="teacache_threshold"):
        engine.generate("a corgi", seed=3, teacache_threshold=-1.0, **SMALL)
    with pytest.raises(ValueError, match="teacache_threshold"):
        wanrt.Engine("tiny", device="cpu", teacache_threshold=-0.1)


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_graph_replay_equals_eager(tiny_official, reference, cfg_batch):
    """The engine's loop through StepGraphs with the recording CPU capturer (a replay re-executes the DiT forward's
    recorded ops and no Python, and a host read in the step would fail the capture): warmup() captures the step of
    its size, a generate() of that size then only replays, and gives the eager loop's latents; TeaCache off and on."""
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", cfg_batch=cfg_batch)
    cap = FakeCapturer(warmup=1)
    e._graphs = make_step_graphs(e.transformer, capturer=cap)
    e.warmup(height=SMALL["height"], width=SMALL["width"], num_frames=SMALL["num_frames"])
    assert cap.captures == 1 and e._graphs.plain.fallback_reasons == {}  # the DiT forward is capture-safe
    warm = dict(e._graphs.plain.stats)
    v = e.generate("a corgi", seed=3, **SMALL)
    plain = v.stats["cuda_graphs"]["plain"]
    calls = SMALL["num_inference_steps"] * (1 if cfg_batch else 2)  # one batch-2 forward, or one per CFG branch
    assert plain["captures"] - warm["captures"] == 0 and cap.captures == 1  # no new capture at the warm-up size
    assert plain["replays"] - warm["replays"] == calls > 0
    assert plain["fallbacks"] == 0 and plain["eager_calls"] == 0
    assert_close(v.latents, reference.latents, name="graph replay latents", tol=FP32_LOOP)
    ref_tc = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa",
                          cfg_batch=cfg_batch).generate("a corgi", seed=3, teacache_threshold=0.25,
                                                        teacache_coefficients=COEFS, **SMALL)
    v = e.generate("a corgi", seed=3, teacache_threshold=0.25, teacache_coefficients=COEFS, **SMALL)
    assert v.stats["teacache"] == ref_tc.stats["teacache"]
    assert_close(v.latents, ref_tc.latents, name="graph replay + TeaCache latents", tol=FP32_LOOP)


def test_cuda_graphs_option_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        wanrt.Engine("tiny", device="cpu", cuda_graphs=True)


# ------------------------------------------------------------------------------ cancellation


def _forbid_decoding(engine, monkeypatch):
    """Make every decode entry point (the VAE's one-shot and streaming decode, and the Engine's) fail the test."""
    def fail(*a, **k):
        pytest.fail("decoded a cancelled video")

    for obj, name in ((engine.vae, "decode"), (engine.vae, "decode_stream"), (engine, "decode_stream")):
        monkeypatch.setattr(obj, name, fail)


def test_callback_returning_false_cancels_and_skips_decode(engine, monkeypatch):
    seen = []
    _forbid_decoding(engine, monkeypatch)
    with pytest.raises(wanrt.Cancelled) as err:
        engine.generate("a corgi", seed=3, callback=lambda i, n, x: seen.append((i, n)) or i < 2, **SMALL)
    assert seen == [(0, 8), (1, 8), (2, 8)]
    assert err.value.step == 2 and err.value.seed == 3
    assert err.value.latents.shape == (1, 16, 2, 4, 6) and err.value.latents.device.type == "cpu"


def test_cancel_event(engine, monkeypatch):
    stop = threading.Event()
    _forbid_decoding(engine, monkeypatch)
    with pytest.raises(wanrt.Cancelled) as err:  # set from "another party" during step 1
        engine.generate("a corgi", seed=3, cancel=stop, callback=lambda i, n, x: stop.set() if i == 1 else None, **SMALL)
    assert err.value.step == 1
    with pytest.raises(wanrt.Cancelled) as err:  # already set: nothing runs
        engine.generate("a corgi", seed=3, cancel=stop, **SMALL)
    assert err.value.step == -1
    with pytest.raises(ValueError, match="threading.Event"):
        engine.generate("a corgi", seed=3, cancel=True, **SMALL)


# ------------------------------------------------------------------------------ embedding in a service


def test_prompt_cache_skips_the_text_encoder(tiny_official, monkeypatch):
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", prompt_cache_size=2)
    encoded = []
    orig = e.text_encoder.encode
    monkeypatch.setattr(e.text_encoder, "encode", lambda ps: encoded.extend(ps) or orig(ps))
    a = e.generate("a corgi", seed=1, **SMALL)
    b = e.generate("a corgi", seed=1, **SMALL)
    assert torch.equal(a.latents, b.latents)
    neg = e.preset.negative_prompt
    assert encoded == ["a corgi", neg]  # the second call encoded nothing
    e.generate("a cat", seed=1, **SMALL)  # evicts "a corgi" (LRU of 2: "a cat" and the negative prompt)
    assert encoded[-1] == "a cat" and e.prompt_cache_info == {"size": 2, "max": 2}
    e.generate("a corgi", seed=1, **SMALL)
    assert encoded[-1] == "a corgi"
    off = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", prompt_cache_size=0)
    off.encode_prompt(["x"])
    assert off.prompt_cache_info["size"] == 0


def test_generate_from_several_threads_is_serialized(engine, reference, monkeypatch):
    active, peak = [0], [0]
    orig = engine.transformer.run_blocks

    def tracked(inp):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return orig(inp)
        finally:
            active[0] -= 1

    monkeypatch.setattr(engine.transformer, "run_blocks", tracked)
    results, errors = [None] * 3, []

    def work(k):
        try:
            results[k] = engine.generate("a corgi", seed=3, **SMALL)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and peak[0] == 1
    for r in results:
        assert torch.equal(r.latents, reference.latents)


def test_warmup(tiny_official):
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32")
    timings = e.warmup(height=32, width=48, num_frames=5)
    assert set(timings) >= {"text_encoder", "denoise", "vae_decode", "total"}
    assert e.preset.negative_prompt in e.text.cache  # the negative prompt is cached for real requests
    with pytest.raises(ValueError, match="height"):
        e.warmup(height=30, width=48, num_frames=5)


def test_repeated_generate_keeps_host_memory_flat(engine):
    """Repeated calls on the tiny model leave no tensor behind: the live tensor storages created during the
    calls (counted by the deterministic ``TensorMemoryTracker``, not the process RSS, which is allocator noise)
    are the same after the 2nd call and after the 8th. A leak of the latents, the conditioning, the caches or
    the graphs of each call would add its bytes per call."""
    import gc

    from wanrt.testing import TensorMemoryTracker

    small = dict(SMALL, num_inference_steps=2)
    engine.generate("a corgi", seed=3, **small)  # the prompt cache and the RoPE tables fill outside the count
    live = []
    with torch.no_grad(), TensorMemoryTracker() as m:
        for k in range(8):
            video = engine.generate("a corgi", seed=k, **small)
            assert video.latents is not None
            del video
            gc.collect()
            live.append(m.live_bytes)
    # the first tracked call may fill per-engine buffers once; after it nothing may grow
    assert live[1:] == [live[1]] * 7, f"live tensor bytes after each call: {live}"


def test_compile_option_compiles_the_blocks(tiny_official, reference):
    """Engine(compile=...) compiles each block in place (state-dict keys unchanged) and gives the same video."""
    torch._dynamo.reset()
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", compile="aot_eager")
    assert all(b._compiled_call_impl is not None for b in e.transformer.blocks)
    assert "blocks.0.self_attn.q.weight" in e.transformer.state_dict()
    v = e.generate("a corgi", seed=3, **SMALL)
    assert_close(v.latents, reference.latents, name="compiled blocks latents", tol=FP32_LOOP)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compile must be"):
        wanrt.Engine("tiny", device="cpu", compile=3)


def test_batched_cfg_falls_back_to_two_passes_when_it_would_not_fit(tiny_official, reference, monkeypatch, caplog):
    import logging

    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", cfg_batch=True)
    monkeypatch.setattr(wanrt.engine, "cfg_batch_fits", lambda *a, **k: False)
    with caplog.at_level(logging.INFO, logger="wanrt"):
        v = e.generate("a corgi", seed=3, **SMALL)
    assert v.stats["cfg_batched"] is False and "would not fit" in caplog.text
    assert torch.equal(v.latents, reference.latents)  # exactly the two-pass reference loop


# ------------------------------------------------------------------------------ streaming decode


def test_on_frames_streams_chunks_and_mp4_writer(engine, reference, tmp_path):
    from wanrt.video import Mp4Writer, read_mp4

    seen = []
    with Mp4Writer(tmp_path / "stream.mp4") as writer:
        v = engine.generate("a corgi", seed=3, on_frames=lambda f, start: seen.append((start, f.shape[0])) or
                            writer.write(f), keep_frames=False, **SMALL)
    assert seen == [(0, 1), (1, 4)]  # 1 frame for the first latent frame, then 4 per latent frame
    assert v.frames.shape == (0, 32, 48, 3)
    frames, fps = read_mp4(tmp_path / "stream.mp4")
    assert frames.shape == reference.frames.shape and fps == 16
    assert torch.equal(v.latents, reference.latents)
    kept = engine.generate("a corgi", seed=3, on_frames=lambda f, start: None, **SMALL)
    assert (kept.frames == reference.frames).all()


def test_decode_stream_equals_one_shot_decode(engine, reference):
    chunks = list(engine.vae.decode_stream(reference.latents))
    assert [c.shape[2] for c in chunks] == [1, 4]
    torch.testing.assert_close(torch.cat(chunks, dim=2), engine.vae.decode(reference.latents), rtol=0, atol=0)


def test_mp4_writer_keeps_partial_file_on_error(tmp_path):
    import numpy as np

    from wanrt.video import Mp4Writer

    path = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="boom"), Mp4Writer(path) as w:
        w.write(np.zeros((2, 16, 16, 3), np.uint8))
        raise RuntimeError("boom")
    assert not path.exists()  # never a truncated file under the final name (the encoder may not have flushed yet)
    with pytest.raises(ValueError, match="frame size changed"), Mp4Writer(tmp_path / "y.mp4") as w:
        w.write(np.zeros((1, 16, 16, 3), np.uint8))
        w.write(np.zeros((1, 16, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="must end in .mp4"):
        Mp4Writer(tmp_path / "z.avi")


def test_vae_backend_triton_decodes_like_eager(tiny_official, reference):
    """vae_backend="triton" (the interpreter here) runs every causal conv through wanrt's kernel."""
    from wanrt.models.vae import CausalConv3d

    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", vae_backend="triton")
    assert all(m.backend == "triton" for m in e.vae.modules() if isinstance(m, CausalConv3d))
    video = e.decode(reference.latents[:, :, :1])  # one latent frame: the interpreter is slow
    ref = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32").decode(reference.latents[:, :, :1])
    assert_close(video, ref, name="triton VAE decode", tol=FP32_LOOP)
    with pytest.raises(ValueError, match="vae_backend must be one of"):
        wanrt.Engine("tiny", device="cpu", vae_backend="cudnn")
    with pytest.raises(ValueError, match="vae_tiling"):
        wanrt.Engine("tiny", device="cpu", vae_tiling="yes")


def test_vae_tiling_option(tiny_official, reference, monkeypatch):
    """vae_tiling=True decodes through wanrt.models.vae_tiling (here the tiny latent plane fits one tile, so the
    video is exactly the untiled one); None tiles automatically above 720P only."""
    import wanrt.models.vae_tiling as tiling

    calls = []
    real = tiling.decode_tiled
    monkeypatch.setattr(tiling, "decode_tiled", lambda vae, lat, *a, **k: calls.append(lat.shape) or real(vae, lat))
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa", vae_tiling=True)
    v = e.generate("a corgi", seed=3, **SMALL)
    assert calls == [(1, 16, 2, 4, 6)] and (v.frames == reference.frames).all()
    auto = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32")
    assert not auto.decoder.use_tiling(torch.zeros(1, 16, 2, 60, 104)) and auto.decoder.use_tiling(torch.zeros(1, 16, 2, 135, 240))
