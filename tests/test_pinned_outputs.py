"""Reshaping the generation code changes no output: the final latents of the pinned cases (every solver,
TeaCache on and off in both modes, batched CFG on and off, guidance 1, a negative prompt, i2v with and without
max_area, flf2v) are bit-identical to those recorded before the reshape (``tests/pinned_cases.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pinned_cases import CASES, run_case, write_checkpoints
from safetensors.torch import load_file

PINNED = load_file(str(Path(__file__).parent / "data" / "pinned_latents.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("pinned"))


def test_every_case_is_pinned():
    assert set(PINNED) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_latents_are_bit_identical_to_the_recorded_ones(name, checkpoints):
    got = run_case(name, checkpoints)
    want = PINNED[name]
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):
        diff = (got - want).abs().max().item()
        rel = ((got - want).norm() / want.norm()).item()
        pytest.fail(f"case {name}: latents differ from the pinned ones (max |diff| {diff:.3e}, relative {rel:.3e})")
