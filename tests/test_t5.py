"""UMT5 text encoder: parity with transformers, buckets, key map, config, tokenizer, wrapper, meta."""

from __future__ import annotations

import math

import pytest
import torch

from wanrt.checkpoints.keymap_t5 import t5_from_official, t5_official_state_dict_from_hf, t5_to_official
from wanrt.checkpoints.tiny_tokenizer import build_tiny_tokenizer
from wanrt.models.t5 import (
    TextEncoder,
    UMT5Config,
    UMT5Encoder,
    _fp16_clamp,
    clean_prompt,
    gelu_tanh,
    relative_position_bucket,
)

TINY = UMT5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2)

NEG_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量"


def official_keys(cfg: UMT5Config) -> set[str]:
    keys = {"token_embedding.weight", "norm.weight"}
    for i in range(cfg.num_layers):
        keys |= {f"blocks.{i}.{n}.weight" for n in ("norm1", "norm2", "attn.q", "attn.k", "attn.v", "attn.o")}
        keys |= {f"blocks.{i}.ffn.{n}.weight" for n in ("gate.0", "fc1", "fc2")}
        keys.add(f"blocks.{i}.pos_embedding.embedding.weight")
    return keys


def hf_tiny_model(cfg: UMT5Config, seed: int = 0):
    """transformers UMT5EncoderModel of ``cfg`` with every parameter drawn from a normal law."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.UMT5EncoderModel(transformers.UMT5Config(**cfg.to_hf_config())).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # the tied embedding appears once
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "shared" in name or "embed_tokens" in name or "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return hf


def padded_batch(lens: list[int], vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lens), max(lens)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        ids[i, n - 1] = 1  # </s>
        ids[i, n:] = 0  # <pad>
    return ids, mask


# ---------------------------------------------------------------------------------------- parity
def test_parity_with_transformers_umt5():
    hf = hf_tiny_model(TINY)
    ours = UMT5Encoder(TINY).eval()
    ours.load_state_dict(t5_official_state_dict_from_hf(hf.state_dict()), strict=True)
    # L = 140 > max_distance exercises the exact, log and capped buckets; padding exercises the mask.
    lens = [140, 70, 9]
    ids, mask = padded_batch(lens, TINY.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    assert out.shape == ref.shape == (3, 140, TINY.dim) and out.dtype == torch.float32
    for i, n in enumerate(lens):
        err = ((out[i, :n] - ref[i, :n]).abs().max() / ref[i, :n].abs().max()).item()
        assert err <= 1e-5, f"sample {i}: rel err {err:.2e}"


def test_padding_does_not_leak_into_real_tokens():
    torch.manual_seed(0)
    model = UMT5Encoder(TINY).eval()
    ids, mask = padded_batch([30, 12], TINY.vocab_size)
    with torch.no_grad():
        batch = model(ids, mask)
        alone = model(ids[1:, :12], None)
    torch.testing.assert_close(batch[1, :12], alone[0], rtol=1e-5, atol=1e-5)


def test_bf16_runs_in_weight_dtype():
    torch.manual_seed(0)
    model = UMT5Encoder(TINY).eval()
    ids, mask = padded_batch([20, 7], TINY.vocab_size)
    with torch.no_grad():
        ref = model(ids, mask)
        out = model.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref)[0].abs().max() / ref[0].abs().max()).item() < 0.05


def test_forward_rejects_bad_shapes():
    model = UMT5Encoder(TINY)
    with pytest.raises(ValueError):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))


def test_gelu_tanh_and_fp16_clamp():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))
    h = torch.tensor([1.0, 60000.0, float("inf")], dtype=torch.float16)
    assert torch.isfinite(_fp16_clamp(h)).all()
    finite = torch.tensor([1.0, 65000.0], dtype=torch.float16)
    assert torch.equal(_fp16_clamp(finite), finite)  # clamps only when something overflowed
    assert _fp16_clamp(torch.tensor([float("inf")], dtype=torch.bfloat16)).isinf().all()


# --------------------------------------------------------------------------------------- buckets
def _bucket_reference(rel: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5 bidirectional bucket of one relative position, written directly in float64."""
    half = num_buckets // 2
    exact = half // 2
    base = half if rel > 0 else 0
    d = abs(rel)
    if d < exact:
        return base + d
    return base + min(half - 1, exact + math.floor(math.log(d / exact) / math.log(max_distance / exact) * (half - exact)))


def test_relative_position_bucket_matches_reference():
    rel = torch.arange(-300, 301)
    ours = relative_position_bucket(rel, 32, 128)
    assert ours.dtype == torch.int64
    assert ours.tolist() == [_bucket_reference(int(r)) for r in rel]
    spot = {0: 0, 1: 17, -1: 1, 7: 23, -7: 7, 8: 24, 16: 26, 32: 28, 64: 30, 127: 31, 128: 31, -128: 15, -999: 15}
    assert {r: int(relative_position_bucket(torch.tensor(r))) for r in spot} == spot


# ------------------------------------------------------------------------------ key map, config
def test_keymap_round_trip():
    hf = hf_tiny_model(TINY)
    hf_keys = list(hf.state_dict())
    assert "encoder.embed_tokens.weight" in hf_keys and "shared.weight" in hf_keys
    assert {t5_to_official(k) for k in hf_keys} == official_keys(TINY)
    for k in hf_keys:
        back = t5_from_official(t5_to_official(k))
        assert back == ("shared.weight" if k == "encoder.embed_tokens.weight" else k)
    for k in official_keys(TINY):
        assert t5_to_official(t5_from_official(k)) == k
    sd = t5_official_state_dict_from_hf(hf.state_dict())
    assert set(sd) == official_keys(TINY)
    only_embed = {"encoder.embed_tokens.weight": 1, "encoder.final_layer_norm.weight": 2}
    assert t5_official_state_dict_from_hf(only_embed) == {"token_embedding.weight": 1, "norm.weight": 2}
    for bad in ("lm_head.weight", "decoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.x.weight"):
        with pytest.raises(KeyError):
            t5_to_official(bad)
    with pytest.raises(KeyError):
        t5_from_official("blocks.0.attn.q.bias")


def test_config_from_shapes_and_hf():
    sd = UMT5Encoder(TINY).state_dict()
    assert UMT5Config.from_state_dict_shapes({k: v.shape for k, v in sd.items()}) == TINY
    assert UMT5Config.from_state_dict_shapes(sd) == TINY  # tensors work too
    assert UMT5Config.from_hf_config(TINY.to_hf_config()) == TINY
    xxl = UMT5Config.from_hf_config(
        {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64, "num_layers": 24,
         "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
         "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}
    )  # fmt: skip
    assert xxl == UMT5Config() and xxl.head_dim == 64
    with pytest.raises(ValueError):
        UMT5Config.from_hf_config({**TINY.to_hf_config(), "feed_forward_proj": "relu"})
    with pytest.raises(ValueError):
        UMT5Config(dim_attn=30, num_heads=4)
    with pytest.raises(ValueError):
        UMT5Config.from_state_dict_shapes({"token_embedding.weight": (10, 4)})


def test_meta_construction_full_size():
    cfg = UMT5Config()
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    sd = model.state_dict()
    assert set(sd) == official_keys(cfg)
    assert not list(model.buffers())
    n = sum(p.numel() for p in model.parameters())
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64
    assert n == 256384 * 4096 + 24 * per_layer + 4096  # 5.68 B
    assert UMT5Config.from_state_dict_shapes(sd) == cfg
    assert not any(UMT5Encoder.keep_fp32(k) for k in sd)


def test_shared_pos_variant():
    cfg = UMT5Config(**{**TINY.__dict__, "shared_pos": True})
    model = UMT5Encoder(cfg).eval()
    sd = model.state_dict()
    assert "pos_embedding.embedding.weight" in sd and not any("blocks.0.pos_embedding" in k for k in sd)
    assert UMT5Config.from_state_dict_shapes(sd) == cfg
    ids, mask = padded_batch([12, 5], cfg.vocab_size)
    with torch.no_grad():
        assert model(ids, mask).shape == (2, 12, cfg.dim)


def test_meta_then_assign_load():
    torch.manual_seed(0)
    src = UMT5Encoder(TINY).eval()
    with torch.device("meta"):
        dst = UMT5Encoder(TINY)
    dst.load_state_dict(src.state_dict(), assign=True)
    ids, mask = padded_batch([10, 4], TINY.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(ids, mask), src(ids, mask), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("umt5_tok")
    build_tiny_tokenizer(str(path), vocab_size=384)
    return str(path)


def test_tiny_tokenizer_folder_and_ids(tok_dir):
    import os

    assert sorted(os.listdir(tok_dir)) == [
        "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    tok = TextEncoder.load_tokenizer(tok_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 384
    ids = tok("A cat walks on the grass.", add_special_tokens=True).input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1] and max(ids) < 384
    zh = tok(clean_prompt(NEG_PROMPT)).input_ids
    assert 2 not in zh  # every character of the negative prompt is in the vocabulary


def test_tiny_tokenizer_is_deterministic(tok_dir, tmp_path):
    build_tiny_tokenizer(str(tmp_path), vocab_size=384)
    for name in ("spiece.model", "tokenizer.json"):
        with open(f"{tok_dir}/{name}", "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    with pytest.raises(ValueError):
        build_tiny_tokenizer(str(tmp_path), vocab_size=10)


def test_text_encoder_trims_to_real_length(tok_dir):
    torch.manual_seed(0)
    tok = TextEncoder.load_tokenizer(tok_dir)
    model = UMT5Encoder(TINY).eval()
    enc = TextEncoder(tok, model, text_len=48)
    prompts = ["A dog runs along the beach at sunset.", "", NEG_PROMPT, "the sky " * 40]
    outs = enc.encode(prompts)
    ids, mask = enc.tokenize(prompts)
    assert ids.shape == mask.shape == (4, 48)
    full = model(ids, mask)
    for i, (p, out) in enumerate(zip(prompts, outs)):
        n = len(tok(clean_prompt(p), truncation=True, max_length=48).input_ids)  # incl. </s>
        assert out.shape == (n, TINY.dim)
        assert ids[i, n - 1] == 1 and bool(mask[i, :n].all()) and not mask[i, n:].any()
        torch.testing.assert_close(out, full[i, :n], rtol=0, atol=0)
    assert outs[1].shape[0] == 1  # empty prompt -> just </s>
    assert outs[3].shape[0] == 48  # truncated, still ends with </s>
    # a bare string is wrapped; bad inputs raise
    torch.testing.assert_close(enc.encode(prompts[0])[0], outs[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        enc.encode([])
    with pytest.raises(TypeError):
        enc.encode([1])  # type: ignore[list-item]


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"
    assert clean_prompt("sch\u00c3\u00b6n") == "schön"  # ftfy fixes mojibake
    assert clean_prompt("色调艳丽，过曝") == "色调艳丽,过曝"  # ftfy: full-width ASCII -> ASCII, as official
    assert clean_prompt("“quoted”\u00a0text") == '"quoted" text'
    with pytest.raises(TypeError):
        clean_prompt(None)  # type: ignore[arg-type]


def test_truncation_is_reported(tmp_path, caplog):
    """A prompt longer than text_len is cut, as in the official code, and a warning says so."""
    import logging

    from wanrt.checkpoints.tiny_tokenizer import build_tiny_tokenizer
    from wanrt.models.t5 import TextEncoder, UMT5Config, UMT5Encoder

    build_tiny_tokenizer(tmp_path / "tok")
    enc = TextEncoder(TextEncoder.load_tokenizer(tmp_path / "tok"),
                      UMT5Encoder(UMT5Config(vocab_size=384, dim=16, dim_attn=16, dim_ffn=32, num_heads=2,
                                             num_layers=1)), text_len=16)
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        short = enc.encode(["a cat"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        long = enc.encode(["a corgi surfing a wave at sunset " * 10])
    assert long[0].shape[0] == 16 and short[0].shape[0] < 16
    assert "truncated" in caplog.text
