"""Narrow guards for core mechanisms that no fast existing test pinned down on its own.

Each test here was written because a deliberate defect of ``tests/mutants.py`` survived (or was caught
only by a slow end-to-end test); ``tests/test_mutants.py`` runs the defect against the test named in the
table, so keep these fast (well under 10 s) and independent of the order they run in.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_dit import LATENT, X_CH, randomize_, tiny_config

import wanrt
from wanrt.models.dit import WanDiT
from wanrt.sampling.loop import GuidedStep
from wanrt.testing import Tolerance, assert_close

# batch-2 vs batch-1 forwards differ by float32 reduction order (~2e-6, times g = 5)
FP32 = Tolerance(atol=1e-4, rtol=1e-4, rel=2e-5)


# ------------------------------------------------------------------------------ classifier-free guidance


@pytest.fixture(scope="module")
def dit():
    model = WanDiT(tiny_config("t2v")).eval()
    randomize_(model, seed=11)
    return model


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_guided_velocity_is_uncond_plus_scale_times_difference(dit, batch_cfg):
    """``v = v_u + g·(v_c − v_u)`` with the two branches computed independently by the DiT's own forward.

    With g = 5 a swapped pair of branches gives ``v_c + g·(v_u − v_c)`` and the other common slip,
    ``v_c + g·(v_c − v_u)``, differs by ``v_c − v_u`` scaled by g: both are far outside the tolerance."""
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, 5, dit.config.text_dim, generator=g)
    uncond = torch.randn(1, 3, dit.config.text_dim, generator=g)
    x = torch.randn(1, X_CH, *LATENT, generator=g)
    t = 437
    with torch.no_grad():
        v_c = dit(x, torch.tensor([t]), cond)
        v_u = dit(x, torch.tensor([t]), uncond)
        # the branches differ (by ~1% here) far beyond the tolerance, so a mixed-up combination shows
        assert ((v_c - v_u).norm() / v_u.norm()).item() > 1e-3
        got = GuidedStep(dit, cond, uncond, 5.0, batch_cfg=batch_cfg)(x, t, 0)
        assert_close(got, v_u + 5.0 * (v_c - v_u), name="guided velocity", tol=FP32)
        # guidance 1 without a negative branch is the conditional velocity itself
        only = GuidedStep(dit, cond, None, 1.0, batch_cfg=batch_cfg)(x, t, 0)
        assert_close(only, v_c, name="unguided velocity", tol=FP32)


# ------------------------------------------------------------------------------ cancellation


SMALL = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 4, "progress": False}


def _spy_decoders(engine, monkeypatch) -> list[str]:
    """Record every entry into a VAE decode path (the engine's and the VAE's own), then run it."""
    calls: list[str] = []
    for obj, name in ((engine, "decode"), (engine, "decode_stream"), (engine.vae, "decode"),
                      (engine.vae, "decode_stream"), (engine.vae, "decode_chunk")):
        orig, label = getattr(obj, name), f"{type(obj).__name__}.{name}"

        def spy(*args, _orig=orig, _name=label, **kwargs):
            calls.append(_name)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(obj, name, spy)
    return calls


def test_cancelled_generation_stops_at_the_step_and_never_decodes(tiny_engine, monkeypatch):
    """A cancel (callback returning False, or the event set) raises at that step boundary: no further DiT
    step, no VAE decode by any entry point, no frames handed to ``on_frames``."""
    decoded = _spy_decoders(tiny_engine, monkeypatch)
    steps: list[int] = []
    frames: list[int] = []
    with pytest.raises(wanrt.Cancelled) as err:
        tiny_engine.generate("a corgi", seed=3, callback=lambda i, n, x: steps.append(i) or i < 1,
                             on_frames=lambda part, start: frames.append(start), **SMALL)
    assert err.value.step == 1 and steps == [0, 1]
    assert decoded == [] and frames == []

    stop = threading.Event()
    steps.clear()
    with pytest.raises(wanrt.Cancelled) as err:
        tiny_engine.generate("a corgi", seed=3, cancel=stop,
                             callback=lambda i, n, x: steps.append(i) or (stop.set() if i == 0 else None),
                             on_frames=lambda part, start: frames.append(start), **SMALL)
    assert err.value.step == 0 and steps == [0]
    assert decoded == [] and frames == []


# ------------------------------------------------------------------------------ the sampling schedule reaches the DiT


def _dit_timesteps(engine, monkeypatch, **kwargs) -> list[int]:
    """The timesteps the DiT is called with during the first two steps of a generation (then cancelled)."""
    seen: list[int] = []
    orig = engine.transformer.prepare

    def prepare(x, t, *args, **kw):
        seen.append(int(torch.as_tensor(t).reshape(-1)[0]))
        return orig(x, t, *args, **kw)

    monkeypatch.setattr(engine.transformer, "prepare", prepare)
    with pytest.raises(wanrt.Cancelled):
        engine.generate("a corgi", seed=3, guidance_scale=1.0, callback=lambda i, n, x: i < 1,
                        **{**SMALL, "num_inference_steps": 6, **kwargs})
    monkeypatch.undo()
    return seen


def test_generate_samples_on_the_shifted_schedule(tiny_engine, monkeypatch):
    """The DiT sees the timesteps of the schedule shifted by the caller's shift, else by the preset's."""
    from wanrt.sampling.schedulers import unipc_sigmas

    for shift in (3.0, None):
        want = unipc_sigmas(6, shift or tiny_engine.preset.shift)[1][:2].tolist()
        assert want != unipc_sigmas(6, 1.0)[1][:2].tolist()  # the shift matters at these steps
        assert _dit_timesteps(tiny_engine, monkeypatch, shift=shift) == want, shift


# ------------------------------------------------------------------------------ text: the prompt LRU and the default negative


def test_prompt_cache_returns_each_prompts_own_embedding(tiny_official):
    """Whatever mix of cached and fresh prompts a call asks for, each gets its own embedding (the text encoder's
    output for that prompt, alone), in the order asked."""
    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", prompt_cache_size=3)
    prompts = ["a corgi", "a cat on a sofa", "blurry", "a dog"]
    with torch.no_grad():
        alone = {p: e.text_encoder.encode([p])[0] for p in prompts}
    assert len({tuple(v.shape) for v in alone.values()}) > 1  # different lengths: a mix-up cannot go unseen

    def check(asked):
        got = e.encode_prompt(asked)
        assert len(got) == len(asked)
        for p, emb in zip(asked, got):
            assert emb.shape == alone[p].shape, (p, asked)
            assert_close(emb, alone[p], name=f"embedding of {p!r} in {asked}", tol=FP32)

    check(prompts[:3])  # all fresh
    check(["blurry", "a corgi", "a cat on a sofa"])  # all cached, another order
    check(["a dog", "a cat on a sofa", "a dog"])  # one fresh (evicts "blurry", the LRU entry), one cached, a repeat
    assert "blurry" not in e.text.cache and e.prompt_cache_info == {"size": 3, "max": 3}
    check(["blurry", "a corgi"])


def test_negative_prompt_defaults_to_the_presets(tiny_engine, monkeypatch):
    """The unconditional branch encodes the preset's negative prompt when none (or "") is given."""

    class Stop(Exception):
        pass

    def record(prompts):
        asked.append(list(prompts))
        raise Stop  # the texts are all this test needs: skip the rest of the generation

    monkeypatch.setattr(tiny_engine.text, "encode", record)
    default = tiny_engine.preset.negative_prompt
    assert default
    for kwargs, want in (({}, ["a corgi", default]), ({"negative_prompt": ""}, ["a corgi", default]),
                         ({"negative_prompt": "blurry"}, ["a corgi", "blurry"]),
                         ({"guidance_scale": 1.0}, ["a corgi"])):
        asked: list[list[str]] = []
        with pytest.raises(Stop):
            tiny_engine.generate("a corgi", seed=3, **SMALL, **kwargs)
        assert asked == [want], kwargs
