"""WanDiT: diffusers parity on tiny random configs, official key lists, configs, dtypes, errors.

Reference: diffusers ``WanTransformer3DModel`` (docs/model-reference.md §2, §3, §9). Every
parameter of the reference is randomised (no default init that could hide a swapped
modulation chunk or a missing norm weight), converted with our key map and loaded strictly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from wanrt.checkpoints.keymap_dit import dit_from_official, dit_to_official
from wanrt.models.dit import DiTConfig, WanDiT, sinusoidal_embedding

TINY = dict(dim=48, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)
IMG_DIM = 20
B, X_CH, Y_CH = 2, 4, 6
LATENT = (3, 6, 10)  # F, H, W latents -> token grid (3, 3, 5)
CTX_LEN = 7  # shorter than text_len = 512


def tiny_config(model_type: str = "t2v", **kw) -> DiTConfig:
    if model_type == "t2v":
        return DiTConfig(model_type=model_type, in_dim=X_CH, out_dim=X_CH, **{**TINY, **kw})
    return DiTConfig(
        model_type=model_type, in_dim=X_CH + Y_CH, out_dim=X_CH, image_dim=IMG_DIM,
        **{**TINY, **kw},
    )


FULL = {
    "1.3B": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                 in_dim=16, out_dim=16),
    "T2V-14B": dict(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                    in_dim=16, out_dim=16),
    "I2V-14B": dict(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                    in_dim=36, out_dim=16),
    "FLF2V-14B": dict(model_type="flf2v", dim=5120, ffn_dim=13824, num_heads=40,
                      num_layers=40, in_dim=36, out_dim=16),
}
# §1 / §3: key counts and parameter counts (billions, 4 significant digits of the table).
EXPECTED = {"1.3B": (825, 1.419), "T2V-14B": (1095, 14.29), "I2V-14B": (1303, 16.39),
            "FLF2V-14B": (1304, 16.40)}


def meta_model(name: str) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(DiTConfig(**FULL[name]))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm weights around 1, everything else N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
        p.copy_(1 + 0.2 * noise if is_norm_weight else 0.2 * noise)


def make_inputs(cfg: DiTConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(B, X_CH, *LATENT, generator=g),
        "t": torch.tensor([999, 437]),
        "context": torch.randn(B, CTX_LEN, cfg.text_dim, generator=g),
    }
    if cfg.has_image_input:
        inputs["y"] = torch.randn(B, Y_CH, *LATENT, generator=g)
        inputs["clip_fea"] = torch.randn(B, cfg.image_tokens, IMG_DIM, generator=g)
    return inputs


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class _F64Sinusoid(torch.nn.Module):
    """The official float64 timestep sinusoid (diffusers computes it in float32)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(t, self.dim)


def run_diffusers(ref, cfg: DiTConfig, inputs: dict) -> torch.Tensor:
    x = inputs["x"]
    context = F.pad(inputs["context"], (0, 0, 0, cfg.text_len - CTX_LEN))  # [B, 512, text_dim]
    kwargs = {}
    if cfg.has_image_input:
        x = torch.cat([x, inputs["y"]], dim=1)  # [B, in_dim, F, H, W]
        clip = inputs["clip_fea"]
        if cfg.model_type == "flf2v":  # diffusers takes the two images as separate samples
            clip = clip.reshape(2 * B, clip.shape[1] // 2, IMG_DIM)  # [2B, 257, image_dim]
        kwargs["encoder_hidden_states_image"] = clip
    with torch.no_grad():
        return ref(x, inputs["t"], context, return_dict=False, **kwargs)[0]


@pytest.fixture(scope="module", params=["t2v", "t2v-no-cross-norm", "i2v", "flf2v"])
def parity_case(request):
    diffusers = pytest.importorskip("diffusers")
    name = request.param
    cfg = tiny_config(name[:3] if name != "flf2v" else "flf2v",
                      **({"cross_attn_norm": False} if "no-cross-norm" in name else {}))
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**cfg.to_diffusers_config()).eval()
    randomize_(ref, seed=len(name))
    sd = {dit_to_official(k): v for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    inputs = make_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
    return cfg, ref, model, inputs, out


# ------------------------------------------------------------------------- parity


def test_parity_with_diffusers(parity_case):
    cfg, ref, _, inputs, out = parity_case
    want = run_diffusers(ref, cfg, inputs)
    assert out.shape == (B, X_CH, *LATENT) and out.dtype == torch.float32
    assert rel_err(out, want) <= 1e-5


def test_parity_with_diffusers_f64_sinusoid(parity_case):
    """With the official float64 sinusoid in the reference, the rest agrees to ~3e-7."""
    cfg, ref, _, inputs, out = parity_case
    ref = copy.deepcopy(ref)
    ref.condition_embedder.timesteps_proj = _F64Sinusoid(cfg.freq_dim)
    assert rel_err(out, run_diffusers(ref, cfg, inputs)) <= 1e-6


def test_batch_equals_single_samples(parity_case):
    _, _, model, inputs, out = parity_case
    for i in range(B):
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            torch.testing.assert_close(model(**single), out[i : i + 1], rtol=1e-5, atol=1e-5)


def test_context_zero_padding_and_scalar_t(parity_case):
    cfg, _, model, inputs, out = parity_case
    padded = dict(inputs, context=F.pad(inputs["context"], (0, 0, 0, cfg.text_len - CTX_LEN)))
    with torch.no_grad():
        torch.testing.assert_close(model(**padded), out, rtol=0, atol=0)
        same_t = dict(inputs, t=torch.tensor([437.0, 437.0]))
        torch.testing.assert_close(model(**dict(inputs, t=437)), model(**same_t))


# ------------------------------------------------------------------------- mixed precision


def test_bf16_weights_keep_fp32_residual_and_output():
    cfg = tiny_config("i2v")
    model = WanDiT(cfg).eval()
    randomize_(model, seed=11)
    inputs = make_inputs(cfg)
    with torch.no_grad():
        ref = model(**inputs)
    mixed = copy.deepcopy(model)
    for name, p in mixed.named_parameters():
        if not WanDiT.keep_fp32(name):
            p.data = p.data.to(torch.bfloat16)
    assert mixed.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert mixed.head.head.weight.dtype == torch.float32
    seen = []
    hooks = [
        # A block returns (residual, (ffn output, gate)): the residual stream must stay float32.
        blk.register_forward_hook(lambda m, a, o: seen.append((o[0].dtype, o[1][0].dtype)))
        for blk in mixed.blocks
    ]
    with torch.no_grad():
        out = mixed(**inputs)
    for h in hooks:
        h.remove()
    assert seen == [(torch.float32, torch.bfloat16)] * cfg.num_layers
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2


# ------------------------------------------------------------------------- keys and counts


@pytest.mark.parametrize("name", list(FULL))
def test_official_key_and_param_counts(name):
    model = meta_model(name)
    sd = model.state_dict()
    n_keys, billions = EXPECTED[name]
    assert len(sd) == n_keys
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e9, 3 if billions < 10 else 2) == billions
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []


def test_official_key_names_1_3b_and_flf2v():
    keys = set(meta_model("1.3B").state_dict())
    expected_top = {
        "patch_embedding.weight", "patch_embedding.bias",
        "text_embedding.0.weight", "text_embedding.0.bias",
        "text_embedding.2.weight", "text_embedding.2.bias",
        "time_embedding.0.weight", "time_embedding.0.bias",
        "time_embedding.2.weight", "time_embedding.2.bias",
        "time_projection.1.weight", "time_projection.1.bias",
        "head.modulation", "head.head.weight", "head.head.bias",
    }
    block = {"modulation", "norm3.weight", "norm3.bias"}
    for mod in ("self_attn", "cross_attn"):
        for lin in "qkvo":
            block |= {f"{mod}.{lin}.weight", f"{mod}.{lin}.bias"}
        block |= {f"{mod}.norm_q.weight", f"{mod}.norm_k.weight"}
    block |= {"ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias"}
    expected = expected_top | {f"blocks.{i}.{k}" for i in range(30) for k in block}
    assert keys == expected
    sd = meta_model("FLF2V-14B").state_dict()
    assert sd["img_emb.emb_pos"].shape == (1, 514, 1280)
    assert sd["patch_embedding.weight"].shape == (5120, 36, 1, 2, 2)
    assert sd["head.head.weight"].shape == (64, 5120)
    assert sd["blocks.0.modulation"].shape == (1, 6, 5120)
    assert {f"img_emb.proj.{i}.weight" for i in (0, 1, 3, 4)} <= set(sd)
    assert {f"blocks.39.cross_attn.{k}" for k in ("k_img.weight", "v_img.bias",
                                                  "norm_k_img.weight")} <= set(sd)


def test_keep_fp32():
    fp32 = [
        "blocks.0.modulation", "head.modulation", "head.head.weight", "head.head.bias",
        "time_embedding.0.weight", "time_embedding.2.bias", "time_projection.1.weight",
        "blocks.7.self_attn.norm_q.weight", "blocks.7.cross_attn.norm_k.weight",
        "blocks.7.cross_attn.norm_k_img.weight", "blocks.7.norm3.weight", "blocks.7.norm3.bias",
        "img_emb.proj.0.weight", "img_emb.proj.4.bias", "img_emb.emb_pos",
    ]
    low = [
        "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias",
        "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k_img.weight", "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.bias", "img_emb.proj.1.weight", "img_emb.proj.3.bias",
    ]
    assert all(WanDiT.keep_fp32(k) for k in fp32)
    assert not any(WanDiT.keep_fp32(k) for k in low)


@pytest.mark.parametrize("name", list(FULL))
def test_keymap_round_trip_official(name):
    for key in meta_model(name).state_dict():
        assert dit_to_official(dit_from_official(key)) == key


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_keymap_covers_every_diffusers_key(model_type):
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny_config(model_type)
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**cfg.to_diffusers_config())
        ours = WanDiT(cfg)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    mapped = {dit_to_official(k): v.shape for k, v in ref_sd.items()}
    assert mapped == {k: v.shape for k, v in our_sd.items()}
    assert all(dit_from_official(dit_to_official(k)) == k for k in ref_sd)


def test_keymap_specific_and_unknown():
    assert dit_to_official("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert dit_from_official("blocks.3.norm3.bias") == "blocks.3.norm2.bias"
    assert dit_to_official("scale_shift_table") == "head.modulation"
    assert dit_to_official("blocks.12.scale_shift_table") == "blocks.12.modulation"
    assert dit_to_official("blocks.0.attn2.to_out.0.weight") == "blocks.0.cross_attn.o.weight"
    assert dit_to_official("proj_out.bias") == "head.head.bias"
    assert dit_to_official("condition_embedder.image_embedder.ff.net.2.weight") == (
        "img_emb.proj.3.weight"
    )
    for bad in ("blocks.0.attn2.norm_added_q.weight", "norm_out.weight", "blocks.x.norm2.weight",
                "scale_shift_table.weight", "blocks.0.norm3.weight", "rope.freqs_cos"):
        with pytest.raises(KeyError):
            dit_to_official(bad)
    for bad in ("blocks.0.norm2.weight", "head.head", "freqs", "modulation"):
        with pytest.raises(KeyError):
            dit_from_official(bad)


# ------------------------------------------------------------------------- configs


def test_official_config_round_trip():
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536,
                "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16,
                "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
                "text_len": 512}
    cfg = DiTConfig.from_official_config(official)
    assert cfg == DiTConfig(**FULL["1.3B"])
    assert cfg.head_dim == 128 and cfg.text_dim == 4096 and cfg.patch_size == (1, 2, 2)
    assert cfg.to_official_config() == {k: v for k, v in official.items()
                                        if k != "_diffusers_version"}
    tiny = tiny_config("flf2v", patch_size=[1, 2, 2])
    assert DiTConfig.from_official_config(tiny.to_official_config()) == tiny
    with pytest.raises(ValueError, match="missing"):
        DiTConfig.from_official_config({"dim": 8})


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_diffusers_config_round_trip(model_type):
    cfg = tiny_config(model_type)
    assert DiTConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    full = DiTConfig(**FULL["I2V-14B"]).to_diffusers_config()
    assert full["added_kv_proj_dim"] == 5120 and full["image_dim"] == 1280
    assert DiTConfig.from_diffusers_config(full).model_type == "i2v"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dim=49), "not divisible"),
        (dict(dim=54, num_heads=6), "head_dim=9 must be even"),
        (dict(model_type="vace", vace_layers=(0, 5)), "below num_layers"),
        (dict(model_type="s2v"), "model_type must be one of"),
        (dict(freq_dim=33), "freq_dim"),
        (dict(patch_size=(1, 2)), "patch_size"),
        (dict(text_len=0), "text_len"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


# ------------------------------------------------------------------------- input errors


@pytest.fixture(scope="module")
def small_models():
    return {mt: WanDiT(tiny_config(mt, num_layers=1)).eval() for mt in ("t2v", "i2v", "flf2v")}


@pytest.mark.parametrize(
    "model_type, change, match",
    [
        ("t2v", dict(context=torch.zeros(B, 513, 24)), "more than text_len=512"),
        ("t2v", dict(context=torch.zeros(B, 5, 23)), "text_dim=24"),
        ("t2v", dict(context=torch.zeros(1, 5, 24)), r"B=2"),
        ("t2v", dict(x=torch.zeros(B, 5, 3, 6, 10)), "in_dim=4 channels"),
        ("t2v", dict(x=torch.zeros(B, 4, 3, 5, 10)), "H=5 must be a positive multiple"),
        ("t2v", dict(x=torch.zeros(B, 4, 6, 10)), r"\[B, C, F, H, W\]"),
        ("t2v", dict(t=torch.zeros(3)), "t must be"),
        ("t2v", dict(y=torch.zeros(B, 6, 3, 6, 10)), "only accepted by i2v"),
        ("t2v", dict(clip_fea=torch.zeros(B, 257, IMG_DIM)), "only accepted by i2v"),
        ("i2v", dict(y=None), "needs the conditioning y"),
        ("i2v", dict(clip_fea=None), "needs clip_fea"),
        ("i2v", dict(clip_fea=torch.zeros(B, 514, IMG_DIM)), "257"),
        ("flf2v", dict(clip_fea=torch.zeros(B, 257, IMG_DIM)), "514"),
        ("i2v", dict(y=torch.zeros(B, 5, 3, 6, 10)), "must equal in_dim=10"),
        ("i2v", dict(y=torch.zeros(B, 6, 3, 6, 8)), "matching x"),
    ],
)
def test_bad_inputs_raise(small_models, model_type, change, match):
    model = small_models[model_type]
    inputs = make_inputs(model.config)
    inputs.update(change)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(**inputs)


def test_sinusoid_is_official_float64_cos_sin():
    t = torch.tensor([999, 3])
    emb = sinusoidal_embedding(t, 8)
    assert emb.dtype == torch.float32 and emb.shape == (2, 8)
    for i in range(4):
        angle = 999 * 10000 ** (-i / 4)
        assert emb[0, i].item() == pytest.approx(math.cos(angle), abs=1e-7)
        assert emb[0, 4 + i].item() == pytest.approx(math.sin(angle), abs=1e-7)
