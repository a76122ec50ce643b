"""Presets: official defaults, validation, architecture checks."""

import dataclasses

import pytest

from wanrt.presets import (
    DEFAULT_NEGATIVE_PROMPT, FLF2V_NEGATIVE_PROMPT, PRESETS, Architecture, Preset, check_against, default_shift,
    get_preset, preset_for_arch,
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
