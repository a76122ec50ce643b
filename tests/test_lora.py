"""LoRA (wanrt.lora): every format against diffusers' ``WanPipeline.load_lora_weights`` or a hand-made weight sum,
fused and runtime modes, strengths, unloading bit for bit, 8-bit weights, i2v, the Engine API and the errors."""

from __future__ import annotations

import logging

import pytest
import torch

import wanrt
from wanrt.lora import LoraError, apply_lora, read_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading needs it (test extra)

SELF = ("q", "k", "v", "o")
LAYERS = [f"self_attn.{n}" for n in SELF] + [f"cross_attn.{n}" for n in SELF] + ["ffn.0", "ffn.2"]
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2", "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj"}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _pairs(model, seed=0, rank=4, layers=LAYERS, blocks=None):
    """Random low-rank pairs ``{(block, layer): (A [r, in], B [out, r])}`` sized for ``model``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in blocks if blocks is not None else range(len(model.blocks)):
        for name in layers:
            lin = model.get_submodule(f"blocks.{i}.{name}")
            out[i, name] = (torch.randn(rank, lin.in_features, generator=g) * 0.2,
                            torch.randn(lin.out_features, rank, generator=g) * 0.2)
    return out


def lora_file(fmt: str, pairs, alpha: float | None = 2.0) -> dict[str, torch.Tensor]:
    """The pairs as a state dict in format ``fmt``."""
    sd = {}
    for (i, name), (a, b) in pairs.items():
        if fmt == "diffusers":
            base = f"transformer.blocks.{i}.{DIFFUSERS[name]}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
            continue
        if fmt == "kohya":
            base = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
        elif fmt == "diffsynth":
            base = f"pipe.dit.blocks.{i}.{name}"
        else:
            base = f"diffusion_model.blocks.{i}.{name}"
        if fmt in ("official-AB", "diffsynth"):
            sfx = ("lora_A.default.weight", "lora_B.default.weight") if fmt == "diffsynth" else \
                ("lora_A.weight", "lora_B.weight")
        else:
            sfx = ("lora_down.weight", "lora_up.weight")
        sd[f"{base}.{sfx[0]}"], sd[f"{base}.{sfx[1]}"] = a, b
        if alpha is not None and fmt not in ("official-AB", "diffsynth"):
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 3, 6, 10, generator=g), torch.randn(1, 20, model.config.text_dim, generator=g)


def _ours(ckpt, dtype=torch.float32, **kw):
    return wanrt.load_transformer(ckpt, device="cpu", dtype=dtype, backend="eager", **kw)


def _theirs(tiny_diffusers):
    ref = diffusers.WanTransformer3DModel.from_pretrained(tiny_diffusers / "transformer").float().eval()
    return ref, diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)


def _pad(ctx, n=512):
    return torch.cat([ctx, ctx.new_zeros(1, n - ctx.shape[1], ctx.shape[2])], dim=1)


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("fmt", ["diffusers", "official-AB", "official-down-up-alpha", "kohya", "diff_b"])
def test_formats_match_diffusers(tiny_official, tiny_diffusers, fmt, strength):
    """The DiT velocity with the LoRA fused, against diffusers' load_lora_weights + set_adapters + fuse_lora on the
    same tiny random model (float32): within 1e-5 relative."""
    ours = _ours(tiny_official)
    pairs = _pairs(ours)
    sd = lora_file("official-down-up-alpha" if fmt == "diff_b" else fmt, pairs)
    if fmt == "diff_b":  # full bias differences beside the pairs (diffusers: lora_B.bias)
        g = torch.Generator().manual_seed(5)
        for i in range(len(ours.blocks)):
            for name in ("self_attn.q", "ffn.0"):
                sd[f"diffusion_model.blocks.{i}.{name}.diff_b"] = torch.randn(
                    ours.get_submodule(f"blocks.{i}.{name}").out_features, generator=g) * 0.1
    ref, pipe = _theirs(tiny_diffusers)
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="x")
    pipe.set_adapters(["x"], [strength])
    pipe.fuse_lora(lora_scale=1.0)
    x, ctx = _inputs(ours)
    t = torch.tensor([700])
    with torch.no_grad():
        base = ours(x, t, ctx)
        name = apply_lora(ours, sd, strength)
        got = ours(x, t, ctx)
        want = ref(x, t, _pad(ctx), return_dict=False)[0]
    assert _rel(got, base) > 1e-3  # the LoRA changes the output: the comparison tests something
    assert _rel(got, want) < 1e-5, fmt
    assert ours.lora.loaded[name].adapter.format == {
        "diffusers": "diffusers/PEFT", "kohya": "kohya"}.get(fmt, "official/ComfyUI")


def _hand_applied(ckpt, pairs, scale, strength, extra=None):
    """A fresh fp32 model whose weights are ``W + strength · scale · B A`` (+ ``extra(model)``): the reference."""
    model = _ours(ckpt)
    with torch.no_grad():
        for (i, name), (a, b) in pairs.items():
            model.get_submodule(f"blocks.{i}.{name}").weight += strength * scale * (b @ a)
        if extra is not None:
            extra(model)
    return model


@pytest.mark.parametrize("prefix", ["", "base_model.model.", "pipe.dit.", "model.diffusion_model.", "transformer.",
                                    "unet.", "diffusion_model."])
def test_diffsynth_and_prefixes_against_the_hand_sum(tiny_official, prefix):
    ours = _ours(tiny_official)
    pairs = _pairs(ours, seed=2)
    sd = {prefix + k.removeprefix("pipe.dit."): v for k, v in lora_file("diffsynth", pairs).items()}
    x, ctx = _inputs(ours)
    with torch.no_grad():
        apply_lora(ours, sd, 0.8)
        ref = _hand_applied(tiny_official, pairs, 1.0, 0.8)
        assert _rel(ours(x, 300, ctx), ref(x, 300, ctx)) < 1e-6
    assert ours.lora.loaded["lora"].adapter.format == "DiffSynth"


def test_full_differences_diff_diff_b_diff_m(tiny_official):
    """``.diff`` (weights, and a parameter), ``.diff_b`` and ``.diff_m`` (the modulation tables) add as they are."""
    ours = _ours(tiny_official)
    g = torch.Generator().manual_seed(3)
    sd, want = {}, []
    for i in range(len(ours.blocks)):
        w = torch.randn(64, 64, generator=g) * 0.05
        b = torch.randn(64, generator=g) * 0.05
        m = torch.randn(1, 6, 64, generator=g) * 0.05
        sd[f"diffusion_model.blocks.{i}.self_attn.o.diff"] = w
        sd[f"diffusion_model.blocks.{i}.self_attn.o.diff_b"] = b
        sd[f"diffusion_model.blocks.{i}.diff_m"] = m
        want.append((i, w, b, m))
    hm = torch.randn(1, 2, 64, generator=g) * 0.05
    sd["diffusion_model.head.diff_m"] = hm

    def extra(model, s=0.5):
        for i, w, b, m in want:
            blk = model.blocks[i]
            blk.self_attn.o.weight += s * w
            blk.self_attn.o.bias += s * b
            blk.modulation += s * m
        model.head.modulation += s * hm

    x, ctx = _inputs(ours)
    with torch.no_grad():
        apply_lora(ours, sd, 0.5)
        assert ours.lora.loaded["lora"].adapter.format == "full differences"
        ref = _hand_applied(tiny_official, {}, 1.0, 0.5, extra)
        assert _rel(ours(x, 300, ctx), ref(x, 300, ctx)) < 1e-6
        ours.lora.remove()
        apply_lora(ours, sd, 0.5, mode="runtime")  # Linears by the branch, modulation written
        assert hasattr(ours.blocks[0].self_attn.o, "lora_branch")
        assert _rel(ours(x, 300, ctx), ref(x, 300, ctx)) < 1e-5


# ------------------------------------------------------------------------------------------------ modes

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_and_runtime_agree_and_unloading_restores_bit_for_bit(tiny_official, dtype):
    ours = _ours(tiny_official, dtype)
    base_state = _state(ours)
    one = lora_file("official-down-up-alpha", _pairs(ours, seed=1, rank=4))
    two = lora_file("kohya", _pairs(ours, seed=2, rank=8, layers=["self_attn.q", "ffn.2"]))
    x, ctx = _inputs(ours)
    with torch.no_grad():
        base = ours(x, 500, ctx)
        apply_lora(ours, one, 0.7, name="one")
        apply_lora(ours, two, -0.4, name="two")
        fused = ours(x, 500, ctx)
        ours.lora.set_strengths({"two": 0.3})
        fused_03 = ours(x, 500, ctx)
        ours.lora.remove("one")
        ours.lora.remove("two")
        assert _same_state(ours, base_state) and torch.equal(ours(x, 500, ctx), base)
        apply_lora(ours, one, 0.7, name="one", mode="runtime")
        apply_lora(ours, two, -0.4, name="two", mode="runtime")
        assert _same_state(ours, base_state)  # runtime: no weight rewritten
        branch = ours.blocks[0].self_attn.q.lora_branch
        assert branch.A.shape[0] == 12 and branch.B.shape[1] == 12  # one concatenated pair for both LoRAs
        runtime = ours(x, 500, ctx)
        ours.lora.set_strengths({"two": 0.3})
        runtime_03 = ours(x, 500, ctx)
        ours.lora.set_strengths({"one": 0.0, "two": 0.0})
        zero = ours(x, 500, ctx)
        ours.lora.remove()
        assert not hasattr(ours.blocks[0].self_attn.q, "lora_branch")
        assert torch.equal(ours(x, 500, ctx), base)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the fused weight is rounded once, the branch is not
    assert _rel(runtime, fused) < tol and _rel(runtime_03, fused_03) < tol
    assert _rel(fused, base) > 1e-2 and _rel(fused_03, fused) > 1e-3
    assert torch.equal(zero, base)  # zero strength adds exact zeros
    # mixed: one fused, one runtime, against both fused
    with torch.no_grad():
        apply_lora(ours, one, 0.7, name="one")
        apply_lora(ours, two, -0.4, name="two", mode="runtime")
        assert _rel(ours(x, 500, ctx), fused) < tol
        ours.lora.remove()
    assert _same_state(ours, base_state)


@pytest.mark.parametrize("precision", ["int8", "fp8", "int8-wo"])
def test_lora_on_8_bit_weights(tiny_official, precision):
    """Fused (dequantize, add, requantize per channel) and runtime LoRAs on 8-bit layers against the LoRA on the fp32
    model, within the format's error; unloading restores the 8-bit weights and scales bit for bit."""
    fp32 = _ours(tiny_official)
    q = _ours(tiny_official, quantization=precision)
    sd = lora_file("official-down-up-alpha", _pairs(fp32, seed=4))
    x, ctx = _inputs(fp32)
    base_state = _state(q)
    with torch.no_grad():
        q_base = q(x, 500, ctx)
        err = _rel(q_base, fp32(x, 500, ctx))  # the format's own error, without a LoRA
        apply_lora(fp32, sd, 1.0)
        ref = fp32(x, 500, ctx)
        apply_lora(q, sd, 1.0)
        fused = q(x, 500, ctx)
        q.lora.remove()
        assert _same_state(q, base_state)
        apply_lora(q, sd, 1.0, mode="runtime")
        runtime = q(x, 500, ctx)
        q.lora.remove()
        assert _same_state(q, base_state) and torch.equal(q(x, 500, ctx), q_base)
    bound = max(3 * err, 2e-3)
    assert _rel(fused, ref) < bound and _rel(runtime, ref) < bound, (err, _rel(fused, ref), _rel(runtime, ref))


def test_t2v_lora_on_i2v_and_i2v_lora_on_t2v(tiny_official, tiny_i2v_official, tiny_i2v_diffusers, caplog):
    i2v = _ours(tiny_i2v_official)
    t2v_pairs = _pairs(i2v, seed=6)  # the layers both models have
    i2v_pairs = {**t2v_pairs, **_pairs(i2v, seed=7, layers=["cross_attn.k_img", "cross_attn.v_img"])}
    sd = lora_file("official-down-up-alpha", i2v_pairs)
    ref, pipe = _theirs(tiny_i2v_diffusers)
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="x")
    pipe.fuse_lora(lora_scale=1.0)
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(1, 16, 3, 6, 10, generator=g), torch.randn(1, 20, i2v.config.text_dim, generator=g)
    y = torch.randn(1, 20, 3, 6, 10, generator=g)
    clip = torch.randn(1, 257, i2v.config.image_dim, generator=g)
    with torch.no_grad():
        apply_lora(i2v, sd, 1.0)
        assert "blocks.0.cross_attn.k_img" in i2v.lora.loaded["lora"].adapter.deltas
        got = i2v(x, torch.tensor([600]), ctx, y=y, clip_fea=clip)
        want = ref(torch.cat([x, y], dim=1), torch.tensor([600]), _pad(ctx), encoder_hidden_states_image=clip,
                   return_dict=False)[0]
    assert _rel(got, want) < 1e-5
    t2v = _ours(tiny_official)
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        apply_lora(t2v, sd, 1.0)  # the image k/v match nothing in a t2v model: warned once, skipped
    warnings = [r.getMessage() for r in caplog.records if "match no layer" in r.getMessage()]
    assert len(warnings) == 1 and f"{2 * 2 * len(t2v.blocks) + 2 * len(t2v.blocks)} keys" in warnings[0]
    assert "k_img" in warnings[0]


# ------------------------------------------------------------------------------------------------ errors

def test_errors_name_the_file_and_the_key(tiny_official, tmp_path):
    ours = _ours(tiny_official)
    with pytest.raises(LoraError, match=r"no key matches this model \(e\.g\. 'foo\.bar', 'baz'"):
        read_lora({"foo.bar": torch.zeros(1), "baz": torch.zeros(1)}, ours)
    big = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 128),
           "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4)}
    with pytest.raises(LoraError, match=r"'diffusion_model\.blocks\.0\.self_attn\.q\.lora_down\.weight' has shape "
                                        r"\[4, 128\], the model's layer needs \[4, 64\]"):
        read_lora(big, ours)
    with pytest.raises(LoraError, match="LyCORIS LoKr"):
        read_lora({"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.zeros(2, 2)}, ours)
    with pytest.raises(LoraError, match="DoRA"):
        read_lora({**lora_file("kohya", _pairs(ours, blocks=[0], layers=["ffn.0"])),
                   "lora_unet_blocks_0_ffn_0.dora_scale": torch.zeros(1, 128)}, ours)
    with pytest.raises(LoraError, match="has no up"):
        read_lora({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 64)}, ours)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="bad.safetensors"):
        read_lora(path, ours)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_lora(tmp_path / "missing.safetensors", ours)
    sd = lora_file("kohya", _pairs(ours, blocks=[0], layers=["ffn.0"]))
    apply_lora(ours, sd, name="x")
    with pytest.raises(LoraError, match="already loaded"):
        apply_lora(ours, sd, name="x")
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_lora(ours, sd, name="y", mode="merge")
    with pytest.raises(ValueError, match="finite"):
        apply_lora(ours, sd, float("nan"), name="y")
    with pytest.raises(KeyError, match="no LoRA named 'nope'"):
        ours.lora.remove("nope")


def test_fusing_into_offloaded_or_gguf_weights_says_runtime(tiny_official):
    from wanrt.offload.mover import BlockMover

    ours = _ours(tiny_official)
    sd = lora_file("kohya", _pairs(ours, blocks=[1], layers=["ffn.0"]))
    ours.offload = BlockMover(ours.blocks, torch.device("cpu"), 0, 2)
    with pytest.raises(LoraError, match="mode='runtime'"):
        apply_lora(ours, sd)
    x, ctx = _inputs(ours)
    ref = _hand_applied(tiny_official, {k: v for k, v in _pairs(ours, blocks=[1], layers=["ffn.0"]).items()},
                        2.0 / 4, 1.0)
    with torch.no_grad():
        apply_lora(ours, sd, mode="runtime")  # the branch lives on the device, the blocks stream
        for _ in range(2):
            assert _rel(ours(x, 400, ctx), ref(x, 400, ctx)) < 1e-5


# ------------------------------------------------------------------------------------------------ the Engine

KW = dict(device="cpu", precision="fp32", backend="eager", prompt_cache_size=0)
OPTS = dict(seed=3, num_inference_steps=3, height=48, width=80, num_frames=9, progress=False)


def test_engine_load_set_unload_and_per_call_strengths(tiny_official, tmp_path):
    from safetensors.torch import save_file

    eng = wanrt.Engine("tiny", tiny_official, **KW)
    pairs = _pairs(eng.transformer, seed=9)
    path = tmp_path / "style_lora.safetensors"
    save_file(lora_file("official-down-up-alpha", pairs), str(path))
    base = eng.generate("a cat", **OPTS)
    assert eng.load_lora(path, 0.8) == "style_lora"
    info = eng.loras["style_lora"]
    assert (info["strength"], info["mode"], info["rank"], info["format"]) == (0.8, "fuse", 4, "official/ComfyUI")
    fused = eng.generate("a cat", **OPTS)
    assert _rel(fused.latents, base.latents) > 1e-3
    eng.set_lora_strengths({"style_lora": 0.0})
    assert torch.equal(eng.generate("a cat", **OPTS).latents, base.latents)
    eng.unload_lora()
    assert eng.loras == {}
    eng.load_lora(path, 0.0, name="rt", mode="runtime")
    assert torch.equal(eng.generate("a cat", **OPTS).latents, base.latents)
    per_call = eng.generate("a cat", loras={"rt": 0.8}, **OPTS)
    assert _rel(per_call.latents, fused.latents) < 1e-5
    assert eng.loras["rt"]["strength"] == 0.0  # the call's strength was for that call only
    assert torch.equal(eng.generate("a cat", **OPTS).latents, base.latents)
    with pytest.raises(ValueError, match=r"loras: 'nope' is not loaded"):
        eng.generate("a cat", loras={"nope": 1.0}, **OPTS)
    eng.load_lora(path, 0.5, name="fused")
    with pytest.raises(ValueError, match=r"'fused' is fused \(change it with set_lora_strengths\)"):
        eng.generate("a cat", loras={"fused": 1.0}, **OPTS)
    with pytest.raises(ValueError, match="loras must be a dict"):
        eng.generate("a cat", loras=["rt"], **OPTS)


def test_cli_lora_flag(tmp_path, capsys):
    from safetensors.torch import save_file

    from wanrt.cli import main

    eng = wanrt.Engine("tiny", **KW)
    path = tmp_path / "x.safetensors"
    save_file(lora_file("kohya", _pairs(eng.transformer, seed=10)), str(path))
    out = tmp_path / "o.mp4"
    base = ["generate", "--prompt", "a cat", "--height", "48", "--width", "80", "--steps", "2", "--seed", "1",
            "--precision", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*base, "--lora", f"{path}:0.7", "--lora", str(path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LoRA x: 0.7 (fuse" in text and "LoRA x_2: 1 (fuse" in text
    assert main([*base, "--lora", f"{tmp_path / 'none.safetensors'}", "-o", str(out)]) == 2
    assert "none.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ few-step sampling

def _loop(model, noise, cond, sigmas, timesteps, lcm_seed=None):
    """A hand-written guidance-1 loop: Euler, or (``lcm_seed``) predict x0 and re-noise with CPU noise."""
    x = noise.clone()
    gen = torch.Generator().manual_seed(lcm_seed + 1) if lcm_seed is not None else None
    ctx = _pad(cond)
    for i, t in enumerate(timesteps):
        with torch.no_grad():
            v = model(x, torch.tensor([t], dtype=torch.float64), ctx)
        if gen is None:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        else:
            x0 = x - sigmas[i] * v
            x = x0 if sigmas[i + 1] == 0 else (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(
                x.shape, generator=gen)
    return x


@pytest.mark.parametrize("solver", ["euler", "lcm"])
def test_the_4_step_recipe_against_a_hand_written_loop(tiny_official, solver):
    """LightX2V's recipe: timesteps [1000, 750, 500, 250] mapped onto the shift-5 flow sigmas (the model sees
    t = 1000, 937.5, 833.3…, 625), CFG off; Euler or lcm (x0, then fresh noise from seed + 1)."""
    eng = wanrt.Engine("tiny", tiny_official, **KW)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 7, eng.transformer.config.text_dim, generator=g)
    noise = torch.randn(1, 16, 3, 6, 10, generator=g)
    video = eng.generate(prompt_embeds=cond, latents=noise, timesteps=[1000, 750, 500, 250], shift=5.0,
                         guidance_scale=1.0, sample_solver=solver, seed=21, height=48, width=80, num_frames=9,
                         progress=False)
    sig = [1.0, 0.9375, 2.5 / 3.0, 0.625]
    sigmas = [float(torch.tensor(s, dtype=torch.float32)) for s in sig] + [0.0]
    x = _loop(eng.transformer, noise, cond, sigmas, [s * 1000 for s in sig], lcm_seed=21 if solver == "lcm" else None)
    assert _rel(video.latents, x) < 1e-5
    again = eng.generate(prompt_embeds=cond, latents=noise, timesteps=[1000, 750, 500, 250], shift=5.0,
                         guidance_scale=1.0, sample_solver=solver, seed=21, height=48, width=80, num_frames=9,
                         progress=False)
    assert torch.equal(again.latents, video.latents)  # deterministic per seed
    if solver == "lcm":
        other = eng.generate(prompt_embeds=cond, latents=noise, timesteps=[1000, 750, 500, 250], shift=5.0,
                             guidance_scale=1.0, sample_solver="lcm", seed=22, height=48, width=80, num_frames=9,
                             progress=False)
        assert _rel(other.latents, video.latents) > 1e-3  # the re-noising follows the seed


def test_custom_sigmas_and_schedule_errors():
    from wanrt.presets import get_preset
    from wanrt.request import resolve_request
    from wanrt.sampling.schedulers import custom_schedule

    sigmas, timesteps = custom_schedule(sigmas=[1.0, 0.5, 0.25], shift=5.0)  # used as given: no shift
    assert sigmas.tolist() == [1.0, 0.5, 0.25, 0.0] and timesteps.tolist() == [1000.0, 500.0, 250.0]
    _, t = custom_schedule(timesteps=[1000, 750, 500, 250], shift=5.0)
    assert t.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)
    p = get_preset("tiny")
    req = resolve_request(p, "a", timesteps=[1000, 750, 500, 250], shift=5.0)
    assert req.num_inference_steps == 4 and req.schedule()[1].tolist()[1] == 937.5
    bad = [
        (dict(timesteps=[1000, 750], sigmas=[1.0, 0.5]), "either timesteps or sigmas"),
        (dict(timesteps=[1000, 750], num_inference_steps=3), "the custom schedule has 2 steps"),
        (dict(timesteps=[750, 1000]), "strictly decreasing"),
        (dict(timesteps=[1001, 10]), r"lie in \(0, 1000\]"),
        (dict(sigmas=[1.5, 0.5]), r"lie in \(0, 1\]"),
        (dict(sigmas=[]), "1 to 1000 values"),
        (dict(timesteps=["a"]), "sequence of numbers"),
        (dict(num_inference_steps=4, teacache_threshold=0.1, teacache_coefficients=(0, 0, 0, 0.1, 0)),
         "TeaCache needs at least 8 steps"),
        (dict(timesteps=[1000, 750, 500, 250], teacache_threshold=0.1, teacache_coefficients=(0, 0, 0, 0.1, 0)),
         "this request has 4"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            resolve_request(p, "a", **kw)


def test_step_graphs_see_fused_changes_and_recapture_for_runtime_branches(tiny_official):
    """With the recording CPU stand-in of CUDA graphs: a fused LoRA (written in place) needs no new capture and the
    replay sees it; adding a runtime LoRA drops the graphs (one new capture), and per-call strengths replay."""
    from test_cuda_graphs import FakeCapturer

    from wanrt.sampling.loop import make_step_graphs

    kw = dict(KW, backend="sdpa")
    e = wanrt.Engine("tiny", tiny_official, **kw)
    ref = wanrt.Engine("tiny", tiny_official, **kw)
    cap = FakeCapturer(warmup=1)
    e._graphs = make_step_graphs(e.transformer, capturer=cap)
    one = lora_file("official-down-up-alpha", _pairs(e.transformer, seed=11))
    two = lora_file("kohya", _pairs(e.transformer, seed=12, layers=["cross_attn.v", "ffn.2"]))
    e.generate("a cat", **OPTS)
    assert cap.captures == 1
    for eng in (e, ref):
        eng.load_lora(one, 0.8, name="f")
    got = e.generate("a cat", **OPTS)
    assert cap.captures == 1 and _rel(got.latents, ref.generate("a cat", **OPTS).latents) < 1e-5
    for eng in (e, ref):
        eng.load_lora(two, 0.5, name="r", mode="runtime")
    got = e.generate("a cat", **OPTS)
    assert cap.captures == 2 and _rel(got.latents, ref.generate("a cat", **OPTS).latents) < 1e-5
    got = e.generate("a cat", loras={"r": -1.0}, **OPTS)
    assert cap.captures == 2
    assert _rel(got.latents, ref.generate("a cat", loras={"r": -1.0}, **OPTS).latents) < 1e-5
