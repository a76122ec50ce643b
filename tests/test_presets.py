"""Presets: official defaults, validation, architecture checks."""

import dataclasses

import pytest

from wanrt.presets import (
    DEFAULT_NEGATIVE_PROMPT, FLF2V_NEGATIVE_PROMPT, PRESETS, TASKS, Architecture, Preset, check_against,
    default_shift, generic_preset, get_preset, preset_for_arch,
)


def test_official_defaults():
    p = get_preset("t2v-14b")
    assert (p.height, p.width, p.num_frames, p.num_inference_steps, p.guidance_scale, p.shift) == (480, 832, 81, 50, 5.0, 5.0)
    assert p.sample_solver == "unipc" and p.fps == 16 and p.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert (p.arch.dim, p.arch.ffn_dim, p.arch.num_heads, p.arch.num_layers) == (5120, 13824, 40, 40)
    s = get_preset("T2V_1.3B")
    assert (s.arch.dim, s.arch.ffn_dim, s.arch.num_heads, s.arch.num_layers) == (1536, 8960, 12, 30)
    assert get_preset("i2v-14b-480p").num_inference_steps == 40
    assert get_preset("flf2v-14b").num_inference_steps == 50 and get_preset("flf2v-14b").shift == 16.0
    assert FLF2V_NEGATIVE_PROMPT.startswith("镜头切换，镜头晃动，")
    assert default_shift(get_preset("i2v-14b-480p"), 480, 832) == 3.0
    assert default_shift(get_preset("i2v-14b-720p"), 720, 1280) == 5.0


def test_presets_are_frozen_and_validated():
    p = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.height = 5
    with pytest.raises(ValueError, match="multiples of 16"):
        dataclasses.replace(p, height=50)
    with pytest.raises(ValueError, match="4k\\+1"):
        dataclasses.replace(p, num_frames=8)
    with pytest.raises(ValueError, match="not divisible"):
        Architecture("t2v", dim=100, ffn_dim=8, num_heads=3, num_layers=1, in_dim=16)
    with pytest.raises(ValueError, match="unknown model preset.*t2v-1.3b"):
        get_preset("sora")


def test_check_against_and_inference():
    arch = dataclasses.asdict(get_preset("t2v-1.3b").arch)
    check_against(get_preset("t2v-1.3b"), arch)
    with pytest.raises(ValueError, match="num_layers: checkpoint 30, preset 40"):
        check_against(get_preset("t2v-14b"), arch)
    assert preset_for_arch(arch).name == "t2v-1.3b"
    assert preset_for_arch(dict(arch, dim=7)) is None
    assert all(isinstance(p, Preset) for p in PRESETS.values())


def test_architecture_of_a_dit_config_checks_and_finds_presets():
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import DiTConfig

    for p in PRESETS.values():
        cfg = dit_config_for(p)
        assert Architecture.from_dit(cfg) == p.arch
        check_against(p, Architecture.from_dit(cfg))
    i2v = Architecture.from_dit(dit_config_for(get_preset("i2v-14b-720p")))
    assert preset_for_arch(i2v, "720p").name == "i2v-14b-720p" and preset_for_arch(i2v).name == "i2v-14b-480p"
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 30, preset 40.*matches preset\(s\) \['t2v-1.3b'\]"):
        check_against(get_preset("t2v-14b"), get_preset("t2v-1.3b").arch)
    with pytest.raises(ValueError, match="text_dim: checkpoint 64, preset 4096"):
        check_against(get_preset("t2v-1.3b"), dataclasses.replace(get_preset("t2v-1.3b").arch, text_dim=64))
    check_against(get_preset("t2v-1.3b"), dataclasses.replace(get_preset("t2v-1.3b").arch, image_dim=7))  # t2v: unused
    assert DiTConfig(model_type="flf2v", dim=8, ffn_dim=8, num_heads=1, num_layers=1, in_dim=36, out_dim=16,
                     text_len=77).model_type in TASKS
    with pytest.raises(ValueError, match="model_type must be one of"):
        DiTConfig(model_type="s2v", dim=8, ffn_dim=8, num_heads=1, num_layers=1, in_dim=16, out_dim=16)

    # A size no preset has: its task's defaults, its own architecture (text_len included).
    odd = Architecture.from_dit(DiTConfig(model_type="i2v", dim=256, ffn_dim=512, num_heads=2, num_layers=3,
                                          in_dim=36, out_dim=16, text_len=77, image_dim=160))
    assert preset_for_arch(odd) is None
    g = generic_preset(odd)
    assert (g.name, g.task, g.arch, g.supported_sizes) == ("custom", "i2v", odd, ()) and g.arch.text_len == 77
    assert dataclasses.replace(g, name="i2v-14b-480p", arch=PRESETS["i2v-14b-480p"].arch,
                               supported_sizes=PRESETS["i2v-14b-480p"].supported_sizes) == PRESETS["i2v-14b-480p"]
    for task, base in (("t2v", "t2v-1.3b"), ("flf2v", "flf2v-14b-720p")):
        g = generic_preset(dataclasses.replace(odd, model_type=task))
        assert (g.task, g.num_inference_steps, g.shift, g.negative_prompt) == (
            task, PRESETS[base].num_inference_steps, PRESETS[base].shift, PRESETS[base].negative_prompt)


def test_the_tiny_preset_is_the_trained_size_and_accepts_its_random_fixtures(tmp_path):
    """``tiny`` expects the trained model (dim 128 x 4 blocks, 128 text tokens) and also loads the random test
    checkpoints (dim 64 x 2 blocks): such a checkpoint gets the preset at its own size, anything else is refused."""
    import wanrt
    from wanrt.checkpoints.tiny import write_checkpoint
    from wanrt.presets import TINY_ARCH, TINY_FIXTURE_ARCH

    tiny = get_preset("tiny")
    assert (tiny.arch.dim, tiny.arch.ffn_dim, tiny.arch.num_heads, tiny.arch.num_layers, tiny.arch.text_len) == \
        (128, 512, 4, 4, 128)
    assert tiny.fixture_archs == (TINY_FIXTURE_ARCH,) and TINY_FIXTURE_ARCH.dim == 64
    assert tiny.for_arch(TINY_ARCH) is tiny
    assert tiny.for_arch(TINY_FIXTURE_ARCH).arch == TINY_FIXTURE_ARCH
    assert tiny.for_arch(dataclasses.replace(TINY_ARCH, num_layers=3)) is None
    check_against(tiny, TINY_FIXTURE_ARCH)
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 3, preset 4"):
        check_against(tiny, dataclasses.replace(TINY_ARCH, num_layers=3))
    with pytest.raises(ValueError, match=r"matches preset\(s\) \['tiny'\]"):
        check_against(get_preset("t2v-1.3b"), TINY_FIXTURE_ARCH)
    assert preset_for_arch(TINY_FIXTURE_ARCH).arch == TINY_FIXTURE_ARCH
    assert preset_for_arch(TINY_ARCH) is tiny

    ckpt = write_checkpoint(tmp_path / "fixture")  # "tiny" by name: the fixture size
    for engine in (wanrt.Engine("tiny", ckpt, device="cpu", precision="fp32"),
                   wanrt.Engine.from_pretrained(ckpt, device="cpu", precision="fp32")):
        assert engine.preset.name == "tiny" and engine.preset.arch == TINY_FIXTURE_ARCH
        assert engine.transformer.config.dim == 64
    trained_size = write_checkpoint(tmp_path / "trained-size", preset=dataclasses.replace(tiny, fixture_archs=()))
    engine = wanrt.Engine("tiny", trained_size, device="cpu", precision="fp32")
    assert engine.preset.arch == TINY_ARCH and engine.transformer.config.num_layers == 4
