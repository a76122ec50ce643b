"""Wan2.2 DiT: per-token timesteps (TI2V) against diffusers ``WanTransformer3DModel`` with ``timestep [B, L]``, the
constant-row shortcut, the CLIP-less i2v of I2V-A14B, the config forms, per-token modulation through the fused-op
backends, sequence parallel, TeaCache and the CUDA-graph refusal (float32, CPU; Triton in the interpreter).

Reference: docs/model-reference.md §Wan2.2 DiT; official ``wan/modules/model.py`` of Wan2.2.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_dit import _F64Sinusoid, randomize_, rel_err

from wanrt.checkpoints.keymap_dit import dit_to_official
from wanrt.models.dit import DiTConfig, WanDiT
from wanrt.ops import OpsPlan
from wanrt.testing import TOLERANCES, assert_close

TINY = dict(dim=48, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)
B, CTX_LEN = 2, 7
LATENT = (3, 6, 10)  # F, H, W latents -> token grid (3, 3, 5): 45 tokens, 15 per latent frame
GRID = (3, 3, 5)
L = 45
FIRST = 15  # tokens of the first latent frame


def ti2v_config(channels: int = 48, **kw) -> DiTConfig:
    return DiTConfig(model_type="ti2v", in_dim=channels, out_dim=channels, **{**TINY, **kw})


def clipless_i2v_config(**kw) -> DiTConfig:
    return DiTConfig(model_type="i2v", in_dim=36, out_dim=16, image_dim=None, **{**TINY, **kw})


def ti2v_timesteps(t: float = 700.0, second: float | None = 300.0) -> torch.Tensor:
    """Wan2.2 TI2V image-to-video: 0 on the first latent frame's tokens, t elsewhere (the second sample at another
    t, so the rows differ)."""
    tt = torch.full((B, L), t)
    if second is not None:
        tt[1] = second
    tt[:, :FIRST] = 0
    return tt


def _pair(cfg: DiTConfig, seed: int):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**cfg.to_diffusers_config()).eval()
    randomize_(ref, seed=seed)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict({dit_to_official(k): v for k, v in ref.state_dict().items()}, strict=True, assign=True)
    return ref, model


def _inputs(channels: int, seed: int = 1, y_channels: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(B, channels, *LATENT, generator=g), "context": torch.randn(B, CTX_LEN, 24, generator=g)}
    if y_channels:
        out["y"] = torch.randn(B, y_channels, *LATENT, generator=g)
    return out


def _diffusers(ref, cfg, inputs, t):
    x = inputs["x"] if "y" not in inputs else torch.cat([inputs["x"], inputs["y"]], dim=1)
    with torch.no_grad():
        return ref(x, t, F.pad(inputs["context"], (0, 0, 0, cfg.text_len - CTX_LEN)), return_dict=False)[0]


@pytest.fixture(scope="module")
def ti2v():
    cfg = ti2v_config()
    ref, model = _pair(cfg, seed=11)
    return cfg, ref, model, _inputs(48)


# ------------------------------------------------------------------------- (a) per-token timesteps vs diffusers


def test_per_token_timesteps_match_diffusers(ti2v):
    cfg, ref, model, inputs = ti2v
    t = ti2v_timesteps()
    with torch.no_grad():
        out = model(t=t, **inputs)
    assert out.shape == (B, 48, *LATENT) and out.dtype == torch.float32
    assert rel_err(out, _diffusers(ref, cfg, inputs, t)) <= 1e-5  # diffusers' float32 sinusoid: measured 2.0e-6
    f64 = copy.deepcopy(ref)
    f64.condition_embedder.timesteps_proj = _F64Sinusoid(cfg.freq_dim)
    assert rel_err(out, _diffusers(f64, cfg, inputs, t)) <= 1e-6  # the official float64 sinusoid: measured 4.7e-7


def test_per_token_timesteps_embed_only_distinct_values(ti2v):
    _, _, model, inputs = ti2v
    t = ti2v_timesteps()
    with torch.no_grad():
        inp = model.prepare(t=t, **inputs)
    assert inp.e.shape == (3, 48) and inp.e0.shape == (3, 6, 48)  # {0, 300, 700}, not B*L rows
    assert inp.t_index.shape == (B, L) and inp.t_index.dtype == torch.int64
    assert inp.t_index[:, :FIRST].eq(0).all() and inp.t_index[0, FIRST:].eq(2).all()
    assert inp.t_index[1, FIRST:].eq(1).all()
    e, _ = model.time_embeddings(torch.tensor([700.0]), 1)
    torch.testing.assert_close(inp.e[2:], e, rtol=1e-6, atol=1e-6)


def test_per_token_rows_are_independent(ti2v):
    """Each sample of a batch with per-token t equals that sample alone (its own distinct values)."""
    _, _, model, inputs = ti2v
    t = ti2v_timesteps()
    with torch.no_grad():
        out = model(t=t, **inputs)
        for i in range(B):
            one = model(inputs["x"][i:i + 1], t[i:i + 1], inputs["context"][i:i + 1])
            assert_close(one, out[i:i + 1], torch.float32, name=f"sample {i}")


def test_first_frame_tokens_see_t0(ti2v):
    """A defect that gives every token the first token's t (t[:, 0]) changes the output: the tokens' t matter."""
    _, _, model, inputs = ti2v
    with torch.no_grad():
        out = model(t=ti2v_timesteps(), **inputs)
        zero = model(t=torch.zeros(B), **inputs)
    assert rel_err(out, zero) > 1e-2


def test_per_token_timesteps_microbatched_and_ffn_chunked(ti2v):
    """The memory plans (samples through each block one at a time, FFN in token chunks) slice the per-token rows."""
    _, _, model, inputs = ti2v
    t = ti2v_timesteps()
    model = copy.deepcopy(model)
    with torch.no_grad():
        want = model(t=t, **inputs)
        model.microbatch = True
        model.set_ffn_chunk(7)
        got = model(t=t, **inputs)
    assert_close(got, want, torch.float32, name="microbatch + ffn chunks")


# ------------------------------------------------------------------------- (b) constant rows: the [B] path


def test_constant_rows_equal_batch_path_bit_for_bit(ti2v, monkeypatch):
    _, _, model, inputs = ti2v
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        want = model(t=t, **inputs)
        inp = model.prepare(t=t[:, None].expand(B, L), **inputs)
        assert inp.t_index is None and inp.e.shape == (B, 48) and inp.e0.shape == (B, 6, 48)

        def no_unique(*a, **k):
            raise AssertionError("a constant [B, L] t must not look for distinct values")

        monkeypatch.setattr(torch, "unique", no_unique)
        got = model(t=t[:, None].expand(B, L).clone(), **inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("t, match", [
    (torch.zeros(B, L + 1), r"per token \[B=2, L=45 video tokens\]"),
    (torch.zeros(B + 1, L), "t must be"),
    (torch.zeros(B, L, 1), "t must be"),
    (torch.zeros(B, L, dtype=torch.bool), "int or float"),
])
def test_bad_timesteps_raise(ti2v, t, match):
    _, _, model, inputs = ti2v
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(t=t, **inputs)


# ------------------------------------------------------------------------- (c) CLIP-less i2v (Wan2.2 I2V-A14B)


def test_clipless_i2v_matches_diffusers():
    cfg = clipless_i2v_config()
    assert cfg.has_image_input and not cfg.has_clip and cfg.image_tokens == 0
    ref, model = _pair(cfg, seed=5)
    assert not hasattr(model, "img_emb") and not hasattr(model.blocks[0].cross_attn, "k_img")
    assert not any("img" in k for k in model.state_dict())
    inputs = _inputs(16, y_channels=20)
    t = torch.tensor([999, 437])
    with torch.no_grad():
        out = model(t=t, **inputs)
    assert out.shape == (B, 16, *LATENT)
    assert rel_err(out, _diffusers(ref, cfg, inputs, t)) <= 1e-5
    with pytest.raises(ValueError, match="has none"), torch.no_grad():
        model(t=t, clip_fea=torch.zeros(B, 257, 1280), **inputs)
    with pytest.raises(ValueError, match="needs the conditioning y"), torch.no_grad():
        model(inputs["x"], t, inputs["context"])


def test_image_dim_none_only_for_i2v():
    for model_type in ("t2v", "flf2v", "ti2v", "vace"):
        with pytest.raises(ValueError, match="image_dim=None"):
            DiTConfig(model_type=model_type, in_dim=36, out_dim=16, image_dim=None, **TINY)


# ------------------------------------------------------------------------- (d) config forms


TI2V_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)


def test_published_wan22_configs():
    official_ti2v = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 3072, "eps": 1e-06,
                     "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48, "model_type": "ti2v", "num_heads": 24,
                     "num_layers": 30, "out_dim": 48, "text_len": 512}
    a = DiTConfig.from_official_config(official_ti2v)
    assert a == DiTConfig(model_type="ti2v", **TI2V_5B)
    diffusers_ti2v = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
                      "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "image_dim": None,
                      "in_channels": 48, "num_attention_heads": 24, "num_layers": 30, "out_channels": 48,
                      "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
                      "rope_max_seq_len": 1024, "text_dim": 4096}
    assert DiTConfig.from_diffusers_config(diffusers_ti2v) == a
    diffusers_i2v_a14b = dict(diffusers_ti2v, in_channels=36, out_channels=16, num_attention_heads=40, num_layers=40,
                              ffn_dim=13824)
    b = DiTConfig.from_diffusers_config(diffusers_i2v_a14b)
    assert (b.model_type, b.image_dim, b.in_dim, b.out_dim, b.has_clip) == ("i2v", None, 36, 16, False)
    assert DiTConfig.from_diffusers_config(dict(diffusers_ti2v, in_channels=16, out_channels=16)).model_type == "t2v"


@pytest.mark.parametrize("cfg", [ti2v_config(), clipless_i2v_config(), DiTConfig(model_type="ti2v", **TI2V_5B)],
                         ids=["ti2v-tiny", "i2v-no-clip", "ti2v-5b"])
def test_config_round_trips(cfg):
    assert DiTConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    official = json.loads(json.dumps(cfg.to_official_config()))  # through JSON: image_dim None is null
    assert DiTConfig.from_official_config(official) == cfg
    if not cfg.has_clip and cfg.has_image_input:
        assert official["image_dim"] is None and cfg.to_diffusers_config()["image_dim"] is None
        assert cfg.to_diffusers_config()["added_kv_proj_dim"] is None


def test_clipless_i2v_detected_from_keys():
    from wanrt.checkpoints.loaders import dit_config_from_shapes, reconcile_clip

    for cfg in (clipless_i2v_config(num_heads=1, dim=128), ti2v_config(num_heads=1, dim=128)):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}
        assert dit_config_from_shapes(shapes) == cfg
    with_clip = DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **TINY)  # a config.json of Wan2.1 i2v's form
    assert reconcile_clip(with_clip, ["blocks.0.self_attn.q.weight"]).image_dim is None
    assert reconcile_clip(with_clip, ["img_emb.proj.0.weight"]) is with_clip
    assert reconcile_clip(with_clip, ["condition_embedder.image_embedder.norm1.weight"]) is with_clip
    assert reconcile_clip(ti2v_config(), []) == ti2v_config()


def test_load_clipless_i2v_with_wan21_form_config(tmp_path):
    """Wan2.2 I2V-A14B ships a config.json of Wan2.1 i2v's form; its weights (no img_emb) say there is no CLIP."""
    from safetensors.torch import save_file

    import wanrt

    cfg = clipless_i2v_config()
    model = WanDiT(cfg)
    randomize_(model, seed=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "dit.safetensors")
    official = DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **TINY).to_official_config()
    assert "image_dim" not in official
    (tmp_path / "config.json").write_text(json.dumps(official))
    loaded = wanrt.load_transformer(tmp_path / "dit.safetensors", device="cpu", dtype=torch.float32,
                                    backend="eager")
    assert loaded.config == cfg
    inputs = _inputs(16, y_channels=20)
    with torch.no_grad():
        assert torch.equal(loaded(t=torch.tensor([5, 900]), **inputs), model(t=torch.tensor([5, 900]), **inputs))


# ------------------------------------------------------------------------- (e) fused-op backends


def test_per_token_modulation_through_triton_fused_ops(ti2v):
    """The Triton modnorm kernels (interpreter on the CPU) read one modulation row per token."""
    pytest.importorskip("triton")
    from wanrt.kernels._common import interpreting

    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    _, _, model, inputs = ti2v
    t = ti2v_timesteps()
    model = copy.deepcopy(model)
    with torch.no_grad():
        want = model(t=t, **inputs)
        model.set_backend(OpsPlan("sdpa", "triton"))
        got = model(t=t, **inputs)
    assert_close(got, want, torch.float32, name="per-token t, fused ops triton")
    assert TOLERANCES[torch.float32].rel == 1e-5


# ------------------------------------------------------------------------- (f) sequence parallel


def _body_sp(rank, world):
    from wanrt.parallel import ParallelConfig
    from wanrt.parallel.dit import SequenceParallelDiT
    from wanrt.parallel.mesh import build_mesh

    torch.manual_seed(0)
    cfg = ti2v_config(channels=8)
    model = WanDiT(cfg).eval()
    randomize_(model, seed=4)
    inputs = _inputs(8)
    t = ti2v_timesteps()
    notes = {}
    with torch.no_grad():
        want = model(t=t, **inputs)
        for name, layout in (("ulysses", ParallelConfig(ulysses=2)), ("ring", ParallelConfig(ring=2))):
            sp = SequenceParallelDiT(model, build_mesh(layout, cfg.num_heads))
            inp = sp.prepare(inputs["x"], t, inputs["context"])
            assert inp.t_index.shape == (B, 23)  # 45 tokens: 23 per rank, one pad token on rank 1
            x, pending = sp.run_blocks(inp)
            got = sp.run_head(inp, x, pending)[0]
            notes[name] = rel_err(got, want)
            assert notes[name] <= 1e-5, (name, notes[name])
    return notes


def test_sequence_parallel_per_token_timesteps_gloo():
    from spawn_group import assert_group_ok, spawn

    outcome = spawn(2, _body_sp)
    assert_group_ok(outcome, 2)


# ------------------------------------------------------------------------- (g) TeaCache, CUDA graphs


def test_teacache_signal_is_the_per_token_rel_l1(ti2v):
    """time_embeddings of a per-token t: the distinct values weighted by their token counts, whose rel_l1 is that of
    the official per-token e / e0 [B, L, ...]."""
    from wanrt.cache.teacache import rel_l1

    _, _, model, _ = ti2v
    t1, t2 = ti2v_timesteps(700.0, 650.0), ti2v_timesteps(600.0, 500.0)
    with torch.no_grad():
        s1, s2 = model.time_embeddings(t1, B), model.time_embeddings(t2, B)
        assert s1[0].shape == (B * 3, 48) and s1[1].shape == (B * 3, 6, 48)
        per_token = []
        for t in (t1, t2):
            e, e0 = model.time_embeddings(t.flatten(), B * L)  # the official per-token tensors
            per_token.append((e.unflatten(0, (B, L)), e0.unflatten(0, (B, L))))
    for i in range(2):
        assert rel_l1(s2[i], s1[i]) == pytest.approx(rel_l1(per_token[1][i], per_token[0][i]), rel=1e-5)


@pytest.mark.parametrize("mode", ["e", "e0"])
def test_teacache_with_per_token_timesteps_runs_and_skips(ti2v, mode):
    from wanrt.cache.teacache import TeaCache, TeaCacheConfig
    from wanrt.sampling.loop import GuidedStep

    _, _, model, inputs = ti2v
    x, ctx = inputs["x"][:1], inputs["context"]
    steps = 8
    cache = TeaCache(TeaCacheConfig(threshold=0.5, mode=mode, coefficients=(1.0, 0.0), warmup_steps=1), steps)
    plain = GuidedStep(model, ctx[:1], ctx[1:], 5.0)
    cached = GuidedStep(model, ctx[:1], ctx[1:], 5.0, teacache=cache)
    with torch.no_grad():
        for i, tv in enumerate(torch.linspace(900, 880, steps)):
            t = ti2v_timesteps(float(tv), None)[0]  # [L]: 0 on the first frame's tokens
            v = cached(x, t, i).clone()
            want = plain(x, t, i)
            assert torch.isfinite(v).all()
            if i in cache.stats["cond"]["computed"]:
                assert_close(v, want, torch.float32, name=f"computed step {i}")
    assert cache.stats["cond"]["skipped"], cache.stats
    assert cache.stats["cond"]["computed"][0] == 0 and steps - 1 in cache.stats["cond"]["computed"]


def test_cuda_graphs_refuse_per_token_timesteps(ti2v):
    """A captured step cannot run per-token timesteps (the distinct values are host reads): GuidedStep runs those
    steps eager, and the graph wrappers refuse them."""
    from test_cuda_graphs import FakeCapturer

    from wanrt.sampling.loop import GuidedStep, make_step_graphs

    _, _, model, inputs = ti2v
    graphs = make_step_graphs(model, capturer=FakeCapturer())
    step = GuidedStep(model, inputs["context"][:1], None, 1.0, graphs=graphs)
    eager = GuidedStep(model, inputs["context"][:1], None, 1.0)
    with torch.no_grad():
        t = ti2v_timesteps(700.0, None)[0]
        assert torch.equal(step(inputs["x"][:1], t, 0), eager(inputs["x"][:1], t, 0))
    assert graphs.plain.stats["captures"] == 0 and graphs.plain.stats["replays"] == 0
    with pytest.raises(ValueError, match="cannot run in a CUDA graph"), torch.no_grad():
        graphs.plain("key", inputs["x"][:1], ti2v_timesteps()[:1], inputs["context"][:1])
    assert graphs.plain.stats["captures"] == 0
