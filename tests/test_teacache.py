"""TeaCache: step decisions on hand-made inputs, buffers, coefficient tables, calibration fit, config validation."""

import math

import numpy as np
import pytest
import torch

from wanrt.cache.teacache import (
    TEACACHE_COEFFICIENTS,
    TEACACHE_MODES,
    CalibrationRecord,
    TeaCache,
    TeaCacheConfig,
    default_coefficients,
    fit_coefficients,
    rel_l1,
)
from wanrt.presets import PRESETS

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # polyval(IDENTITY, rel) == rel


def geometric_inputs(n, rel=0.1, shape=(1, 8), start=1.0):
    """Inputs whose relative L1 change between consecutive steps is exactly ``rel`` (up to float32 rounding)."""
    return [torch.full(shape, start * (1.0 + rel) ** k) for k in range(n)]


def run(cache, inputs, branch="cond", store=True):
    """Feed ``inputs`` as steps 0.. of ``branch``, storing a residual after every computed step."""
    decisions = []
    for i, x in enumerate(inputs):
        compute = cache.should_compute(branch, i, x)
        if compute and store:
            cache.store(branch, torch.full((1, 3, 4), float(i)))
        decisions.append(compute)
    return decisions


# ---------------------------------------------------------------------------------------------- decisions


def test_mode_e_by_hand():
    # rel 0.1 per step, identity rescale, threshold 0.25:
    # 0 warmup; 1 acc .1 skip; 2 acc .2 skip; 3 acc .3 compute (reset); 4 acc .1 skip; 5 last step.
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=6, branches=("cond",))
    assert run(cache, geometric_inputs(6)) == [True, False, False, True, False, True]
    assert cache.stats == {"cond": {"computed": [0, 3, 5], "skipped": [1, 2, 4]}}
    assert cache.summary() == {"cond": {"computed": 3, "skipped": 3}}
    assert torch.equal(cache.residual("cond"), torch.full((1, 3, 4), 5.0))  # from the last computed step


def test_accumulator_resets_after_compute():
    # Without the reset at step 3, step 4 would see acc .4 >= .25 and compute.
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=7, branches=("cond",))
    assert run(cache, geometric_inputs(7)) == [True, False, False, True, False, False, True]


def test_previous_input_updated_on_skipped_steps():
    # Inputs 1, 1.1, 1.21: vs the previous step rel is .1 each (acc .2 at step 2: skip); had step 1's input
    # not replaced the previous one, step 2 would compare with step 0 (rel .21, acc .31: compute).
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=4, branches=("cond",))
    assert run(cache, geometric_inputs(4)) == [True, False, False, True]
    # Same check with an input that jumps back to an earlier value: step 2 equals step 0 (rel vs step 1 is
    # 1/1.5 - 1 ~ .333 -> compute), proving it is compared with step 1, not step 0 (rel 0 -> skip).
    cache = TeaCache(TeaCacheConfig(0.6, "e", IDENTITY), num_steps=4, branches=("cond",))
    xs = [torch.full((1, 8), v) for v in (1.0, 1.5, 1.0, 1.0)]
    # step 1: rel .5 acc .5 skip; step 2: rel 1/3 acc .833 compute; step 3: last
    assert run(cache, xs) == [True, False, True, True]


def test_mode_e0_warmup_five():
    # 0..4 always compute without accumulating (a huge change at step 2 does not matter), then as in mode e.
    xs = geometric_inputs(10, shape=(1, 6, 4))
    xs[2] = xs[2] * 100.0
    xs[3] = xs[2] * 1.1
    xs[4] = xs[3] * 1.1
    for k in range(5, 10):
        xs[k] = xs[k - 1] * 1.1
    cfg = TeaCacheConfig(0.25, "e0", IDENTITY)
    assert cfg.warmup_steps is None and cfg.effective_warmup_steps == 5
    cache = TeaCache(cfg, num_steps=10, branches=("cond",))
    assert run(cache, xs) == [True] * 5 + [False, False, True, False, True]
    assert cache.stats["cond"] == {"computed": [0, 1, 2, 3, 4, 7, 9], "skipped": [5, 6, 8]}


def test_warmup_override_and_last_step():
    cfg = TeaCacheConfig(10.0, "e", IDENTITY, warmup_steps=3)  # a huge threshold: everything else skips
    cache = TeaCache(cfg, num_steps=6, branches=("cond",))
    assert run(cache, geometric_inputs(6)) == [True, True, True, False, False, True]
    cache = TeaCache(TeaCacheConfig(10.0, "e0", IDENTITY), num_steps=8, branches=("cond",))
    assert run(cache, geometric_inputs(8, shape=(2, 6, 3))) == [True] * 5 + [False, False, True]
    cache = TeaCache(TeaCacheConfig(10.0, "e", IDENTITY), num_steps=1, branches=("cond",))
    assert run(cache, geometric_inputs(1)) == [True]


def test_branches_are_independent():
    # cond changes by .1 per step (skips), uncond by .5 (always reaches .25: computes); calls interleave.
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=6)
    assert cache.branches == ("cond", "uncond")
    cond, uncond = geometric_inputs(6, rel=0.1), geometric_inputs(6, rel=0.5, start=3.0)
    got = {"cond": [], "uncond": []}
    for i in range(6):
        for branch, xs in (("cond", cond), ("uncond", uncond)):
            compute = cache.should_compute(branch, i, xs[i])
            if compute:
                cache.store(branch, torch.full((2, 2), 1.0 if branch == "cond" else -1.0))
            got[branch].append(compute)
    assert got["cond"] == [True, False, False, True, False, True]
    assert got["uncond"] == [True] * 6
    assert cache.summary() == {"cond": {"computed": 3, "skipped": 3}, "uncond": {"computed": 6, "skipped": 0}}
    assert cache.residual("cond")[0, 0] == 1.0 and cache.residual("uncond")[0, 0] == -1.0


@pytest.mark.parametrize("threshold", [0.0, 0, None])
def test_threshold_zero_never_skips(threshold):
    negative = (0.0, 0.0, 0.0, 0.0, -1.0)  # acc goes negative: any positive threshold would skip
    skipping = TeaCache(TeaCacheConfig(0.01, "e0", negative, warmup_steps=1), num_steps=6, branches=("cond",))
    assert run(skipping, geometric_inputs(6, shape=(1, 6, 2))) == [True, False, False, False, False, True]

    cfg = TeaCacheConfig(threshold, "e0", negative, warmup_steps=1)
    assert cfg.threshold == 0.0 and not cfg.enabled
    cache = TeaCache(cfg, num_steps=6)
    for branch in cache.branches:
        assert run(cache, geometric_inputs(6, shape=(1, 6, 2)), branch=branch) == [True] * 6
    assert cache.stats["uncond"] == {"computed": list(range(6)), "skipped": []}
    assert cache._state["cond"].prev_input is None  # disabled: no comparison at all
    # The real e0 table of t2v-1.3b has a negative constant term too.
    real = TeaCache(TeaCacheConfig(0, "e0", default_coefficients("t2v-1.3b", "e0")), num_steps=12)
    assert all(run(real, [torch.full((1, 6, 4), 1.0)] * 12))


def test_skip_needs_a_stored_residual():
    cfg = TeaCacheConfig(10.0, "e", IDENTITY)
    cache = TeaCache(cfg, num_steps=6, branches=("cond",))
    assert run(cache, geometric_inputs(6), store=False) == [True] * 6
    with pytest.raises(RuntimeError, match="no residual stored"):
        cache.residual("cond")
    cache = TeaCache(cfg, num_steps=6, branches=("cond",))
    xs = geometric_inputs(6)
    assert [cache.should_compute("cond", i, xs[i]) for i in range(3)] == [True, True, True]
    cache.store("cond", torch.ones(2))
    assert [cache.should_compute("cond", i, xs[i]) for i in range(3, 6)] == [False, False, True]


def test_non_finite_change_computes():
    cache = TeaCache(TeaCacheConfig(10.0, "e", IDENTITY), num_steps=4, branches=("cond",))
    xs = [torch.ones(1, 4), torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4)]  # rel vs zeros is inf
    assert run(cache, xs) == [True, False, True, True]


def test_order_and_branch_errors():
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=3)
    x = torch.ones(1, 4)
    with pytest.raises(ValueError, match="expected step 0, got 1"):
        cache.should_compute("cond", 1, x)
    with pytest.raises(ValueError, match="unknown TeaCache branch 'neg'"):
        cache.should_compute("neg", 0, x)
    with pytest.raises(ValueError, match="unknown TeaCache branch"):
        cache.store("neg", x)
    assert cache.should_compute("cond", 0, x)
    with pytest.raises(ValueError, match="expected step 1, got 0"):
        cache.should_compute("cond", 0, x)  # a repeated step
    assert cache.should_compute("uncond", 0, x)  # the other branch keeps its own counter
    cache.should_compute("cond", 1, x)
    cache.should_compute("cond", 2, x)
    with pytest.raises(ValueError, match="call reset"):
        cache.should_compute("cond", 0, x)
    with pytest.raises(ValueError, match="step 3 >= num_steps 3"):
        cache.should_compute("cond", 3, x)
    with pytest.raises(TypeError, match="step must be an int"):
        cache.should_compute("uncond", 1.0, x)
    assert sorted(cache.stats["cond"]["computed"] + cache.stats["cond"]["skipped"]) == [0, 1, 2]


def test_input_checks():
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=4, branches=("cond",))
    with pytest.raises(ValueError, match=r"mode 'e' expects .* \[B, dim\]"):
        cache.should_compute("cond", 0, torch.ones(1, 6, 4))
    with pytest.raises(ValueError, match="floating-point"):
        cache.should_compute("cond", 0, torch.ones(1, 4, dtype=torch.int64))
    cache.should_compute("cond", 0, torch.ones(1, 4))
    with pytest.raises(ValueError, match="shape changed"):
        cache.should_compute("cond", 1, torch.ones(2, 4))
    assert cache.should_compute("cond", 1, torch.ones(1, 4))  # the failed call did not advance; no residual yet
    assert cache.stats["cond"] == {"computed": [0, 1], "skipped": []}
    e0 = TeaCache(TeaCacheConfig(0.25, "e0", IDENTITY), num_steps=4, branches=("cond",))
    with pytest.raises(ValueError, match=r"mode 'e0' expects .* \[B, 6, dim\]"):
        e0.should_compute("cond", 0, torch.ones(1, 4))
    with pytest.raises(ValueError, match="num_steps"):
        TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=0)
    with pytest.raises(ValueError, match="branches"):
        TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=3, branches=("cond", "cond"))
    with pytest.raises(ValueError, match="branches"):
        TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=3, branches=())


def test_stats_are_copies_and_reset_forgets_everything():
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=6)
    run(cache, geometric_inputs(6), "cond")
    stats = cache.stats
    stats["cond"]["computed"].append(99)
    assert cache.stats["cond"]["computed"] == [0, 3, 5]
    assert cache.stats["uncond"] == {"computed": [], "skipped": []}

    cache.reset()
    assert cache.stats == {b: {"computed": [], "skipped": []} for b in ("cond", "uncond")}
    with pytest.raises(RuntimeError):
        cache.residual("cond")
    # A new video starts at step 0; no residual and no previous input survive, so step 1 computes.
    xs = geometric_inputs(6)
    assert cache.should_compute("cond", 0, xs[0])
    assert cache.should_compute("cond", 1, xs[1])
    cache.store("cond", torch.zeros(1))
    assert not cache.should_compute("cond", 2, xs[2])


# ---------------------------------------------------------------------------------------------- buffers


def test_buffers_are_reused():
    cache = TeaCache(TeaCacheConfig(0.25, "e", IDENTITY), num_steps=6, branches=("cond",))
    xs = [x.to(torch.bfloat16) for x in geometric_inputs(6, shape=(2, 16))]
    cache.should_compute("cond", 0, xs[0])
    prev = cache._state["cond"].prev_input
    assert prev.dtype == torch.float32 and prev.device == xs[0].device
    assert prev.data_ptr() != xs[0].data_ptr()
    prev_ptr = prev.data_ptr()

    r = torch.randn(2, 5, 16)
    cache.store("cond", r)
    res_ptr = cache.residual("cond").data_ptr()
    assert res_ptr != r.data_ptr() and torch.equal(cache.residual("cond"), r)
    r.add_(1.0)  # the cache holds a copy
    assert not torch.equal(cache.residual("cond"), r)

    for i in range(1, 6):
        compute = cache.should_compute("cond", i, xs[i])
        if compute:
            new = torch.randn(2, 5, 16)
            cache.store("cond", new)
            assert torch.equal(cache.residual("cond"), new)
        assert cache._state["cond"].prev_input.data_ptr() == prev_ptr
        assert torch.equal(cache._state["cond"].prev_input, xs[i].float())
        assert cache.residual("cond").data_ptr() == res_ptr

    # A different shape or dtype gets a new buffer with the given dtype.
    cache.store("cond", torch.ones(3, 5, 16, dtype=torch.bfloat16))
    assert cache.residual("cond").shape == (3, 5, 16) and cache.residual("cond").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- coefficients


def test_coefficient_tables():
    presets = {"t2v-1.3b", "t2v-14b", "i2v-14b-480p", "i2v-14b-720p"}
    assert set(TEACACHE_COEFFICIENTS) == presets and presets <= set(PRESETS)
    assert TEACACHE_MODES == ("e", "e0")
    for name in presets:
        for mode in TEACACHE_MODES:
            c = default_coefficients(name, mode)
            assert isinstance(c, tuple) and len(c) == 5 and all(math.isfinite(v) for v in c)
            TeaCacheConfig.for_preset(name, 0.1, mode)  # valid configs
    assert default_coefficients("flf2v-14b", "e") is None and default_coefficients("tiny", "e0") is None
    assert default_coefficients("T2V_1.3B", "e") == TEACACHE_COEFFICIENTS["t2v-1.3b"]["e"]
    assert default_coefficients("t2v-14b", "e0")[0] == -3.03318725e05
    with pytest.raises(ValueError, match="mode"):
        default_coefficients("t2v-14b", "e1")
    with pytest.raises(ValueError, match="no TeaCache coefficients for preset 'flf2v-14b'"):
        TeaCacheConfig.for_preset("flf2v-14b", 0.1)


def test_spot_check_t2v_13b_e_polynomial():
    # 2396.76752 r^4 - 1311.10545 r^3 + 201.331979 r^2 - 8.29855975 r + 0.137887774 at r = 0.01, by hand:
    # 2.39676752e-5 - 1.31110545e-3 + 2.01331979e-2 - 8.29855975e-2 + 0.137887774 = 0.0737482366252
    c = default_coefficients("t2v-1.3b", "e")
    r = 0.01
    by_terms = c[0] * r**4 + c[1] * r**3 + c[2] * r**2 + c[3] * r + c[4]
    assert by_terms == pytest.approx(0.0737482366252, rel=1e-12)
    assert float(np.polyval(c, r)) == pytest.approx(0.0737482366252, rel=1e-12)


def test_real_polynomial_drives_decisions():
    # With the 1.3B "e" table, rel 0.01 per step adds ~0.0737 per step: threshold 0.2 skips two steps in three.
    cache = TeaCache(TeaCacheConfig.for_preset("t2v-1.3b", 0.2), num_steps=8, branches=("cond",))
    assert run(cache, geometric_inputs(8, rel=0.01, shape=(1, 32))) == [
        True, False, False, True, False, False, True, True
    ]


# ---------------------------------------------------------------------------------------------- calibration


def test_rel_l1():
    prev = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    cur = prev + torch.tensor([[0.5, 0.5, -0.5, 0.5]])
    assert rel_l1(cur, prev) == pytest.approx(0.5 / 2.5)
    assert rel_l1(cur.to(torch.bfloat16), prev.to(torch.bfloat16)) == pytest.approx(0.2)
    assert rel_l1(prev, prev) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        rel_l1(cur, prev.T)


def test_fit_coefficients_recovers_a_quartic():
    true = TEACACHE_COEFFICIENTS["t2v-1.3b"]["e"]
    rec = CalibrationRecord()
    for x in np.linspace(0.005, 0.3, 40):
        rec.add(x, np.polyval(true, x))
    rec.add(float("nan"), 1.0)  # non-finite pairs are dropped
    got = fit_coefficients(rec.input_changes, rec.output_changes)
    assert len(got) == 5 and all(isinstance(v, float) for v in got)
    np.testing.assert_allclose(got, true, rtol=1e-6)
    assert len(fit_coefficients([0.1, 0.2, 0.3], [1.0, 2.0, 3.5], degree=2)) == 3
    TeaCacheConfig(0.1, "e", got)  # usable directly


def test_fit_coefficients_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 5 finite"):
        fit_coefficients([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="at least 5 finite"):
        fit_coefficients([0.1, 0.2, 0.3, 0.4, float("nan")], [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="all 6 input changes are equal"):
        fit_coefficients([0.1] * 6, [1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="distinct"):
        fit_coefficients([0.1, 0.1, 0.2, 0.2, 0.3, 0.3], [1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="same length"):
        fit_coefficients([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="degree"):
        fit_coefficients([0.1, 0.2], [1.0, 2.0], degree=-1)


def test_calibration_record_records_each_branch_against_its_previous_step():
    rec = CalibrationRecord("e0")
    assert rec.mode == "e0" and CalibrationRecord().mode == "e"
    with pytest.raises(ValueError, match="mode"):
        CalibrationRecord("ret")
    es = [x.to(torch.bfloat16) for x in geometric_inputs(4, rel=0.25, shape=(1, 6, 2))]
    vs = {"cond": geometric_inputs(4, rel=0.5, shape=(1, 16)), "uncond": geometric_inputs(4, rel=0.125, shape=(1, 16))}
    buf = torch.empty(1, 16)  # one velocity buffer overwritten every call, as GuidedStep's graph outputs are
    for i in range(4):
        for b in ("cond", "uncond"):
            rec(b, i, es[i], buf.copy_(vs[b][i]))  # the record is the recorder: __call__ is record()
    assert len(rec.input_changes) == len(rec.output_changes) == 6  # no pair at each branch's first step
    np.testing.assert_allclose(rec.input_changes, [0.25] * 6, rtol=1e-6)  # bf16 inputs, compared in float32
    np.testing.assert_allclose(rec.output_changes, [0.5, 0.125] * 3, rtol=1e-6)
    assert rec.output_changes[0] == rel_l1(vs["cond"][1], vs["cond"][0])

    fit = CalibrationRecord()
    for x in np.linspace(0.01, 0.3, 12):
        fit.add(x, 2.0 * x + 0.5)
    assert fit.fit(1) == fit_coefficients(fit.input_changes, fit.output_changes, 1)
    np.testing.assert_allclose(fit.fit(1), (2.0, 0.5), rtol=1e-9)


@pytest.mark.parametrize("mode", TEACACHE_MODES)
def test_calibration_record_is_a_guided_step_recorder(tiny_official, mode):
    """GuidedStep reads the record's mode and feeds it the step's modulated input and each branch's velocity."""
    import wanrt
    from wanrt.sampling.loop import GuidedStep

    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa")
    cond, uncond = (t[None] for t in e.encode_prompt(["a corgi", "blurry"]))
    rec = CalibrationRecord(mode)
    step = GuidedStep(e.transformer, cond, uncond, 5.0, recorder=rec)
    x = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    timesteps = (999, 800, 600)
    for i, t in enumerate(timesteps):
        step(x, t, i)
    assert len(rec.input_changes) == 4  # 2 branches x steps 1, 2
    mods = [e.transformer.time_embeddings(torch.tensor([t]), 1)[mode == "e0"] for t in timesteps]
    assert rec.input_changes == [rel_l1(mods[1], mods[0])] * 2 + [rel_l1(mods[2], mods[1])] * 2
    assert all(v > 0 for v in rec.output_changes)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"threshold": "0.1"}, "threshold"),
        ({"threshold": 0.1, "mode": "ret"}, "mode"),
        ({"threshold": 0.1, "coefficients": ()}, "coefficients are required"),
        ({"threshold": 0.1, "coefficients": (1.0, float("nan"))}, "finite"),
        ({"threshold": 0.1, "coefficients": (1.0, float("inf"))}, "finite"),
        ({"threshold": 0.1, "coefficients": "12"}, "sequence"),
        ({"threshold": 0.1, "coefficients": (1.0,), "warmup_steps": 0}, "warmup_steps"),
        ({"threshold": 0.1, "coefficients": (1.0,), "warmup_steps": 1.5}, "warmup_steps"),
    ],
)
def test_config_validation(kwargs, match):
    kwargs.setdefault("coefficients", IDENTITY)
    with pytest.raises(ValueError, match=match):
        TeaCacheConfig(**kwargs)


def test_config_normalizes():
    cfg = TeaCacheConfig(1, "e", [0, 1], warmup_steps=np.int64(2))
    assert cfg.threshold == 1.0 and isinstance(cfg.threshold, float)
    assert cfg.coefficients == (0.0, 1.0) and isinstance(cfg.coefficients, tuple)
    assert cfg.warmup_steps == 2 and cfg.effective_warmup_steps == 2 and cfg.enabled
    assert hash(cfg) == hash(TeaCacheConfig(1.0, "e", (0.0, 1.0), 2))
    assert TeaCacheConfig(0.1, "e", IDENTITY).effective_warmup_steps == 1


# ------------------------------------------------------------------------------ the skipped step, on a real DiT


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_skipped_step_is_head_of_input_plus_last_computed_residual(tiny_official, batch_cfg):
    """A skipped branch's velocity is exactly the head applied to that step's prepared input plus the residual
    (blocks' output - blocks' input) of the branch's last computed step.

    The residual is recorded here independently, from the blocks' own outputs (``run_blocks`` returns the
    residual before the last gated FFN add: the blocks' output is ``x + y * gate``), not from the cache."""
    import wanrt
    from wanrt.sampling.loop import GuidedStep
    from wanrt.sampling.schedulers import make_solver

    e = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="sdpa")
    m = e.transformer
    steps = 6
    cond, uncond = (t[None] for t in e.encode_prompt(["a corgi", "blurry"]))
    cache = TeaCache(TeaCacheConfig(threshold=0.25, coefficients=(0.0, 0.0, 0.0, 0.1, 0.0)), num_steps=steps)

    blocks_calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (blocks' input, blocks' output) per call
    orig_run_blocks = m.run_blocks

    def spy_run_blocks(inp):
        x, pending = orig_run_blocks(inp)
        out = x if pending is None else x + pending[0].float() * pending[1]
        blocks_calls.append((inp.x.float().clone(), out.clone()))
        return x, pending

    m.run_blocks = spy_run_blocks
    velocities: dict[tuple[str, int], torch.Tensor] = {}

    def recorder(branch, step, _mod, v):
        velocities[(branch, step)] = v.detach().clone()

    try:
        step_fn = GuidedStep(m, cond, uncond, 5.0, batch_cfg=batch_cfg, teacache=cache, recorder=recorder)
        solver = make_solver("unipc", steps, 5.0)
        x = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
        contexts = {"cond": step_fn.context[0:1], "uncond": step_fn.context[1:2]}
        last_residual: dict[str, torch.Tensor] = {}
        checked = 0
        for i, t in enumerate(solver.timesteps.tolist()):
            n_calls = len(blocks_calls)
            x_in = x.clone()
            v = step_fn(x, int(t), i)
            new = blocks_calls[n_calls:]
            computed = [b for b in ("cond", "uncond") if i in cache.stats[b]["computed"]]
            # which block call belongs to which branch (one batch-2 call, or one call per branch in order)
            if batch_cfg and len(computed) == 2:
                (inp, out), = new
                per_branch = {"cond": (inp[0:1], out[0:1]), "uncond": (inp[1:2], out[1:2])}
            else:
                assert len(new) == len(computed)
                per_branch = dict(zip(computed, new))
            for b, (inp, out) in per_branch.items():
                last_residual[b] = out - inp
            for b in ("cond", "uncond"):
                if b in computed:
                    continue
                prep = m.prepare(x_in, torch.tensor([int(t)]), contexts[b])
                expected = m.run_head(prep, prep.x.float() + last_residual[b])[0]
                got = velocities[(b, i)]
                err = ((got - expected).norm() / expected.norm()).item()
                assert err <= 1e-6, f"step {i} branch {b}: skipped velocity off by {err:.2e}"
                # and it is not what the head gives without the residual (the residual matters here)
                bare = m.run_head(prep, prep.x.float())[0]
                assert ((got - bare).norm() / bare.norm()).item() > 1e-3
                checked += 1
            x = solver.step(v, i, x)
    finally:
        m.run_blocks = orig_run_blocks
    assert checked >= 2, cache.summary()  # at least one skipped step per branch was checked
