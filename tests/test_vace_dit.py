"""The VACE DiT (official ``VaceWanModel``): parity with diffusers ``WanVACETransformer3DModel`` on tiny random
configs, the two key layouts, the config forms, and the errors of a hint-stream input that does not fit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from wanrt.checkpoints.keymap_dit import dit_from_official, dit_to_official
from wanrt.models.dit import DiTConfig, WanDiT
from wanrt.models.dit_config import default_vace_layers

from test_dit import _F64Sinusoid, randomize_, rel_err

TINY = dict(dim=48, ffn_dim=64, num_heads=2, num_layers=4, freq_dim=32, text_dim=24, in_dim=4, out_dim=4)
VACE_IN = 10
B, CTX_LEN = 2, 7


def vace_config(**kw) -> DiTConfig:
    return DiTConfig(**{"model_type": "vace", "vace_layers": (0, 2), "vace_in_dim": VACE_IN, **TINY, **kw})


def inputs_for(cfg: DiTConfig, latent=(3, 6, 10), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, cfg.in_dim, *latent, generator=g),
        "t": torch.tensor([999, 437]),
        "context": torch.randn(B, CTX_LEN, cfg.text_dim, generator=g),
        "vace_context": torch.randn(B, cfg.vace_in_dim, *latent, generator=g),
    }


def run_diffusers(ref, cfg: DiTConfig, inp: dict, scale) -> torch.Tensor:
    context = F.pad(inp["context"], (0, 0, 0, cfg.text_len - CTX_LEN))
    n = len(cfg.vace_layers)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    scale = scale.expand(n) if scale.ndim == 0 else scale
    with torch.no_grad():
        return ref(inp["x"], inp["t"], context, control_hidden_states=inp["vace_context"],
                   control_hidden_states_scale=scale, return_dict=False)[0]


@pytest.fixture(scope="module")
def pair():
    diffusers = pytest.importorskip("diffusers")
    cfg = vace_config()
    torch.manual_seed(0)
    ref = diffusers.WanVACETransformer3DModel(**cfg.to_diffusers_config()).eval()
    randomize_(ref, seed=5)
    sd = {dit_to_official(k): v for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return cfg, ref, model.eval()


@pytest.mark.parametrize("scale", [1.0, 0.5, "per-layer"])
@pytest.mark.parametrize("latent", [(3, 6, 10), (4, 6, 10)], ids=["video", "with-reference-frame"])
def test_parity_with_diffusers(pair, scale, latent):
    cfg, ref, model = pair
    scale = torch.tensor([0.3, 1.7]) if scale == "per-layer" else scale
    inp = inputs_for(cfg, latent)
    with torch.no_grad():
        out = model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"], vace_scale=scale)
    want = run_diffusers(ref, cfg, inp, scale)
    assert out.shape == (B, cfg.out_dim, *latent) and out.dtype == torch.float32
    assert rel_err(out, want) <= 1e-5
    # the hints matter: without them (scale 0) the output is another one
    with torch.no_grad():
        off = model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"], vace_scale=0.0)
    assert rel_err(off, want) > 1e-2


def test_parity_with_f64_sinusoid_is_tighter(pair):
    cfg, ref, model = pair
    import copy

    ref = copy.deepcopy(ref)
    ref.condition_embedder.timesteps_proj = _F64Sinusoid(cfg.freq_dim)
    inp = inputs_for(cfg)
    with torch.no_grad():
        out = model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"], vace_scale=0.7)
    assert rel_err(out, run_diffusers(ref, cfg, inp, 0.7)) <= 1e-6


def test_zero_scale_is_the_t2v_model(pair):
    """With scale 0 the hints drop out: the output is the plain DiT of the same main weights."""
    cfg, _, model = pair
    t2v = WanDiT(DiTConfig(model_type="t2v", **TINY)).eval()
    t2v.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("vace_")}, strict=True)
    inp = inputs_for(cfg)
    with torch.no_grad():
        a = model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"], vace_scale=0.0)
        b = t2v(inp["x"], inp["t"], inp["context"])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_microbatched_samples_equal_the_batch(pair):
    cfg, _, model = pair
    inp = inputs_for(cfg)
    with torch.no_grad():
        whole = model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"])
        model.microbatch = True
        try:
            parts = model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"])
        finally:
            model.microbatch = False
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- keys and configs


def test_official_keys_and_diffusers_keys_map_both_ways(pair):
    cfg, ref, model = pair
    official = set(model.state_dict())
    assert {"vace_patch_embedding.weight", "vace_blocks.0.before_proj.weight", "vace_blocks.1.after_proj.bias",
            "vace_blocks.1.modulation", "vace_blocks.0.norm3.weight"} <= official
    assert "vace_blocks.1.before_proj.weight" not in official  # only the first VACE block adds the tokens
    assert {dit_to_official(k) for k in ref.state_dict()} == official
    assert {dit_from_official(k) for k in official} == set(ref.state_dict())
    assert dit_from_official("vace_blocks.3.before_proj.weight") == "vace_blocks.3.proj_in.weight"
    assert dit_to_official("vace_blocks.0.norm2.bias") == "vace_blocks.0.norm3.bias"
    with pytest.raises(KeyError):
        dit_to_official("vace_blocks.0.before_proj.weight")  # an official key is not a diffusers key


def test_vace_blocks_keep_their_modulation_fp32():
    assert WanDiT.keep_fp32("vace_blocks.4.modulation")
    assert WanDiT.keep_fp32("vace_blocks.4.norm3.weight")
    assert not WanDiT.keep_fp32("vace_blocks.4.after_proj.weight")


def test_config_round_trips():
    cfg = vace_config()
    official = cfg.to_official_config()
    assert official["_class_name"] == "VaceWanModel" and official["model_type"] == "vace"
    assert official["vace_layers"] == [0, 2] and official["vace_in_dim"] == VACE_IN
    assert DiTConfig.from_official_config(json.loads(json.dumps(official))) == cfg
    assert DiTConfig.from_diffusers_config(json.loads(json.dumps(cfg.to_diffusers_config()))) == cfg
    # the official default when config.json has no vace_layers: every other block
    assert DiTConfig(model_type="vace", **TINY).vace_layers == (0, 2)
    # released layouts: 1.3B 15 of 30 blocks, 14B 8 of 40
    assert default_vace_layers(30, 15) == tuple(range(0, 30, 2))
    assert default_vace_layers(40, 8) == (0, 5, 10, 15, 20, 25, 30, 35)
    with pytest.raises(ValueError, match="evenly"):
        default_vace_layers(40, 7)


@pytest.mark.parametrize("layers, match", [((1, 2), "start at block 0"), ((0, 2, 2), "strictly increasing"),
                                           ((0, 4), "below num_layers"), (("0",), "block indices")])
def test_bad_vace_layers_are_refused(layers, match):
    with pytest.raises(ValueError, match=match):
        vace_config(vace_layers=layers)


def test_vace_layers_only_for_vace():
    with pytest.raises(ValueError, match="only for model_type='vace'"):
        DiTConfig(model_type="t2v", vace_layers=(0,), **TINY)


def test_hint_input_errors(pair):
    cfg, _, model = pair
    inp = inputs_for(cfg)
    x, t, ctx, vc = inp["x"], inp["t"], inp["context"], inp["vace_context"]
    with pytest.raises(ValueError, match="needs vace_context"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match=r"vace_context must be \[2, 10, 3, 6, 10\]"):
        model(x, t, ctx, vace_context=vc[:, :, :2])
    with pytest.raises(ValueError, match=r"vace_context must be"):
        model(x, t, ctx, vace_context=vc[:, :8])
    with pytest.raises(ValueError, match="one per VACE block"):
        model(x, t, ctx, vace_context=vc, vace_scale=torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        model(x, t, ctx, vace_context=vc, vace_scale=float("nan"))
    t2v = WanDiT(DiTConfig(model_type="t2v", **TINY))
    with pytest.raises(ValueError, match="only accepted by VACE models"):
        t2v(x, t, ctx, vace_context=vc)


def test_each_hint_is_made_when_its_block_needs_it(pair):
    """The hint stream runs interleaved with the main blocks: VACE block n right after main block vace_layers[n],
    so one hint is alive at a time (the official code makes them all first); the output is the same."""
    cfg, _, model = pair
    order = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: order.append(f"main {i}")) for i, b in enumerate(model.blocks)]
    hooks += [b.register_forward_hook(lambda m, a, o, n=n: order.append(f"vace {n}"))
              for n, b in enumerate(model.vace_blocks)]
    inp = inputs_for(cfg)
    try:
        with torch.no_grad():
            model(inp["x"], inp["t"], inp["context"], vace_context=inp["vace_context"])
    finally:
        for h in hooks:
            h.remove()
    assert order == ["main 0", "vace 0", "main 1", "main 2", "vace 1", "main 3"]
