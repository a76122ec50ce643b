"""Tests of wanrt.sampling.schedulers: schedules, solver parity and convergence.

Levels:
1. schedules against an independent NumPy re-derivation of the official Wan2.1 code;
2. full sampling loops against diffusers' UniPC / DPM-Solver++ driven with the same sigmas;
3. convergence on flows with a known exact solution (point mass; Gaussian data);
4. Euler against its definition; 5. bad input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from wanrt.sampling.schedulers import (
    NUM_TRAIN_TIMESTEPS,
    SOLVER_NAMES,
    DPMSolver,
    EulerSolver,
    LCMSolver,
    UniPCSolver,
    dpm_sigmas,
    euler_sigmas,
    make_solver,
    shift_sigmas,
    unipc_sigmas,
)

ODE_SOLVERS = tuple(n for n in SOLVER_NAMES if n != "lcm")  # lcm re-noises: it follows no ODE
STEP_SHIFT_CASES = [(1, 5.0), (2, 3.0), (3, 1.0), (10, 8.0), (20, 3.0), (30, 12.0), (40, 16.0), (50, 5.0), (100, 5.0)]


# --------------------------------------------------------------------------- (1) schedules


def official_unipc_schedule(n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """FlowUniPCMultistepScheduler(shift=1) then set_timesteps(n, shift), re-derived in NumPy."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train_sigmas = (1.0 - alphas).astype(np.float32)  # torch float32 in the official __init__
    train_sigmas = 1 * train_sigmas / (1 + (1 - 1) * train_sigmas)  # shift=1 at construction
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = np.linspace(sigma_max, sigma_min, n + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = (sigmas * 1000).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    return sigmas, timesteps


def official_dpm_schedule(n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """get_sampling_sigmas(n, shift) passed as sigmas= to FlowDPMSolverMultistepScheduler(shift=1)."""
    sigmas = np.linspace(1, 0, n + 1)[:n]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = np.asarray(sigmas)
    sigmas = 1 * sigmas / (1 + (1 - 1) * sigmas)  # set_timesteps applies config.shift = 1
    timesteps = (sigmas * 1000).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    return sigmas, timesteps


def test_unipc_50_steps_shift_5_official_timesteps():
    sigmas, timesteps = unipc_sigmas(50, 5.0)
    ref_sigmas, ref_timesteps = official_unipc_schedule(50, 5.0)
    assert timesteps.dtype == torch.int64 and timesteps.shape == (50,)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert timesteps.tolist() == ref_timesteps.tolist()
    assert timesteps[:4].tolist() == [999, 995, 991, 987]
    assert timesteps[-4:].tolist() == [302, 241, 172, 92]
    assert torch.equal(sigmas, torch.from_numpy(ref_sigmas))
    assert sigmas[-1].item() == 0.0
    # sigma_max is float32(0.999) before the shift
    assert sigmas[0].item() == pytest.approx(5 * 0.999 / (1 + 4 * 0.999), abs=1e-7)


@pytest.mark.parametrize("n,shift", STEP_SHIFT_CASES)
def test_unipc_schedule_matches_official_derivation(n, shift):
    sigmas, timesteps = unipc_sigmas(n, shift)
    ref_sigmas, ref_timesteps = official_unipc_schedule(n, shift)
    assert timesteps.tolist() == ref_timesteps.tolist()
    assert torch.equal(sigmas, torch.from_numpy(ref_sigmas))
    assert torch.all(sigmas[1:] < sigmas[:-1])
    e_sigmas, e_timesteps = euler_sigmas(n, shift)
    assert torch.equal(e_sigmas, sigmas) and torch.equal(e_timesteps, timesteps)


@pytest.mark.parametrize("n,shift", STEP_SHIFT_CASES)
def test_dpm_schedule_matches_official_derivation(n, shift):
    sigmas, timesteps = dpm_sigmas(n, shift)
    ref_sigmas, ref_timesteps = official_dpm_schedule(n, shift)
    assert timesteps.dtype == torch.int64 and timesteps.shape == (n,)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,)
    assert timesteps.tolist() == ref_timesteps.tolist()
    assert torch.equal(sigmas, torch.from_numpy(ref_sigmas))
    assert timesteps[0].item() == 1000 and sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0


def test_shift_sigmas_formula_and_types():
    grid = np.linspace(0, 1, 11)
    for s in (0.5, 1.0, 3.0, 5.0, 16.0):
        expected = s * grid / (1 + (s - 1) * grid)
        t = shift_sigmas(torch.from_numpy(grid), s)
        assert t.dtype == torch.float64
        np.testing.assert_array_equal(t.numpy(), expected)
        np.testing.assert_array_equal(shift_sigmas(grid, s), expected)
        assert shift_sigmas(0.25, s) == pytest.approx(s * 0.25 / (1 + (s - 1) * 0.25))
        assert shift_sigmas(0.0, s) == 0.0 and shift_sigmas(1.0, s) == 1.0
    np.testing.assert_array_equal(shift_sigmas(grid, 1.0), grid)
    f32 = shift_sigmas(torch.linspace(0, 1, 7), 5.0)
    assert f32.dtype == torch.float32 and torch.all(f32[1:] > f32[:-1])


# --------------------------------------------------------------------------- (2) parity with diffusers


def fake_velocity(x: torch.Tensor, sigma: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, deterministic stand-in for the DiT."""
    return a * torch.sin(1.3 * x + sigma) + b * (0.5 + sigma) - 0.25 * x


def _latent_case(seed: int = 0, shape=(1, 4, 3, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def _run(solver, reference, x_init, a, b):
    """Run our solver and a diffusers scheduler side by side; return both final samples."""
    x = x_init.clone()
    y = x_init.clone()
    for i in range(solver.num_steps):
        sigma = float(solver.sigmas[i])
        x = solver.step(fake_velocity(x, sigma, a, b), i, x)
        y = reference.step(fake_velocity(y, sigma, a, b), reference.timesteps[i], y).prev_sample
    return x, y


PARITY_CASES = [(1, 5.0), (2, 8.0), (3, 1.0), (10, 3.0), (25, 16.0), (50, 5.0)]


@pytest.mark.parametrize("n,shift", PARITY_CASES)
def test_unipc_matches_diffusers_unipc(n, shift):
    diffusers = pytest.importorskip("diffusers")
    ours = make_solver("unipc", n, shift)
    assert isinstance(ours, UniPCSolver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000,
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    # diffusers' own flow grid starts at linspace(1, 0.001) (≠ official); it accepts custom
    # unshifted sigmas with use_flow_sigmas, and shifts them with flow_shift: pass the official
    # pre-shift grid linspace(float32(0.999), 0, n+1)[:-1].
    sigma_max = float(np.float32(1 - 1 / 1000))
    ref.set_timesteps(sigmas=np.linspace(sigma_max, 0.0, n + 1)[:-1])
    ref.set_begin_index(0)
    assert torch.equal(ref.sigmas, ours.sigmas) and torch.equal(ref.timesteps, ours.timesteps)
    a, b, x_init = _latent_case()
    x, y = _run(ours, ref, x_init, a, b)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,shift", PARITY_CASES)
def test_dpm_matches_diffusers_dpmsolver(n, shift):
    diffusers = pytest.importorskip("diffusers")
    ours = make_solver("dpm++", n, shift)
    assert isinstance(ours, DPMSolver)
    # diffusers' DPMSolverMultistepScheduler.set_timesteps takes no custom sigmas; its step()
    # reads self.sigmas / self.timesteps by index, so install the official schedule directly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=1.0,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        ref.set_timesteps(n)
    ref.sigmas = ours.sigmas.clone()
    ref.timesteps = ours.timesteps.clone()
    ref.set_begin_index(0)
    a, b, x_init = _latent_case(1)
    x, y = _run(ours, ref, x_init, a, b)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- (3) convergence


@pytest.mark.parametrize("n,shift", [(1, 5.0), (2, 3.0), (7, 1.0), (20, 5.0)])
def test_lcm_with_an_exact_x0_model_lands_on_x0(n, shift):
    """A model that knows x0 (``v = (x − x0)/σ``): lcm predicts x0 exactly at every step, re-noises it, and returns
    it at the last step, whatever noise it drew."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 16, 3, 4, 5, generator=g, dtype=torch.float64)
    solver = make_solver("lcm", n, shift, seed=9)
    x = torch.randn(2, 16, 3, 4, 5, generator=g, dtype=torch.float64)
    for i in range(n):
        x = solver.step((x - x0) / float(solver.sigmas[i]), i, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ODE_SOLVERS)
@pytest.mark.parametrize("n,shift", [(1, 5.0), (2, 3.0), (7, 1.0), (20, 5.0), (50, 8.0)])
def test_straight_line_flow_lands_on_x0(name, n, shift):
    """x_σ = (1−σ)x0 + σε with the model returning the exact v = ε − x0: every solver hits x0."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, 3, 4, 5, generator=g)
    eps = torch.randn(2, 16, 3, 4, 5, generator=g)
    solver = make_solver(name, n, shift)
    s0 = float(solver.sigmas[0])
    x = (1 - s0) * x0 + s0 * eps
    for i in range(n):
        x = solver.step(eps - x0, i, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


class GaussianFlow:
    """Data x0 ~ N(μ, s²) per coordinate, noise ε ~ N(0, 1), x_σ = (1−σ)x0 + σε.

    With a = 1 − σ and V(σ) = a²s² + σ², the exact velocity field is
    v(x, σ) = E[ε − x0 | x_σ = x] = (σ − a s²)/V · (x − aμ) − μ, and the probability-flow ODE
    dx/dσ = v keeps the standard score z = (x − aμ)/√V constant, so the exact solution from x at
    σ_0 is x(0) = μ + s·z.
    """

    def __init__(self, n_coords: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.linspace(-1.0, 1.0, n_coords, dtype=torch.float64)
        self.s = torch.linspace(0.5, 1.5, n_coords, dtype=torch.float64)[torch.randperm(n_coords, generator=g)]
        self.z = torch.randn(n_coords, generator=g, dtype=torch.float64)

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        a = 1 - sigma
        var = a * a * self.s**2 + sigma * sigma
        return (sigma - a * self.s**2) / var * (x - a * self.mu) - self.mu

    def error(self, name: str, n: int, shift: float) -> float:
        solver = make_solver(name, n, shift)
        s0 = float(solver.sigmas[0])
        a0 = 1 - s0
        x = a0 * self.mu + torch.sqrt(a0 * a0 * self.s**2 + s0 * s0) * self.z  # float64: no fp32 floor
        for i in range(n):
            x = solver.step(self.velocity(x, float(solver.sigmas[i])), i, x)
        assert x.dtype == torch.float64
        exact = self.mu + self.s * self.z
        return (x - exact).pow(2).mean().sqrt().item()


def _slope(ns, errs) -> float:
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def test_gaussian_flow_errors_shrink_and_orders():
    flow = GaussianFlow()
    ns = [10, 20, 40, 80, 160]
    errs = {(name, shift): [flow.error(name, n, shift) for n in ns] for name in ODE_SOLVERS for shift in (1.0, 5.0)}
    for key, e in errs.items():
        assert all(e[k + 1] < e[k] for k in range(len(e) - 1)), (key, e)
    for shift in (1.0, 5.0):
        # Euler is first order: halving the step halves the error.
        assert 0.9 < _slope(ns[1:], errs[("euler", shift)][1:]) < 1.1
        # The second-order multistep methods beat Euler clearly at equal steps.
        for k, n in enumerate(ns):
            if n >= 40:
                assert errs[("unipc", shift)][k] < errs[("euler", shift)][k] / 4, (shift, n)
                assert errs[("dpm++", shift)][k] < errs[("euler", shift)][k] / 4, (shift, n)
    # Observed order on the unshifted grid (asymptotic regime): UniPC-2 with UniC ~2,
    # DPM-Solver++(2M) ~1.7 (its first two steps from σ=1 are first order in λ).
    assert _slope(ns[1:], errs[("unipc", 1.0)][1:]) > 1.9
    assert _slope(ns[1:], errs[("dpm++", 1.0)][1:]) > 1.4


# --------------------------------------------------------------------------- (4) Euler and the step contract


@pytest.mark.parametrize("n,shift", [(1, 5.0), (4, 3.0), (30, 5.0)])
def test_euler_follows_its_definition(n, shift):
    solver = make_solver("euler", n, shift)
    assert isinstance(solver, EulerSolver)
    sigmas, timesteps = unipc_sigmas(n, shift)
    assert torch.equal(solver.sigmas, sigmas) and torch.equal(solver.timesteps, timesteps)
    a, b, x = _latent_case(2)
    for i in range(n):
        v = fake_velocity(x, float(sigmas[i]), a, b)
        expected = x + (sigmas[i + 1] - sigmas[i]) * v
        x = solver.step(v, i, x)
        assert torch.equal(x, expected)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_attributes(name):
    solver = make_solver(name, 12, 5.0)
    assert solver.name == name and len(solver) == 12 and solver.num_steps == 12
    assert solver.timesteps.dtype == torch.int64 and solver.timesteps.shape == (12,)
    assert solver.sigmas.dtype == torch.float32 and solver.sigmas.shape == (13,)
    assert solver.sigmas[-1].item() == 0.0
    expected = dpm_sigmas(12, 5.0) if name == "dpm++" else unipc_sigmas(12, 5.0)
    assert torch.equal(solver.sigmas, expected[0]) and torch.equal(solver.timesteps, expected[1])
    torch.testing.assert_close(
        solver.timesteps, (solver.sigmas[:-1].double() * NUM_TRAIN_TIMESTEPS).long(), rtol=0, atol=1
    )


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_last_step_returns_x0_pred(name):
    n = 6
    solver = make_solver(name, n, 3.0)
    a, b, x = _latent_case(4)
    for i in range(n - 1):
        x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
    v = fake_velocity(x, float(solver.sigmas[n - 1]), a, b)
    out = solver.step(v, n - 1, x)
    torch.testing.assert_close(out, x - float(solver.sigmas[n - 1]) * v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_reuse_and_reset_give_identical_trajectories(name):
    solver = make_solver(name, 8, 5.0)
    a, b, x_init = _latent_case(5)

    def loop():
        x = x_init.clone()
        for i in range(8):
            x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
        return x

    first = loop()
    assert torch.equal(loop(), first)  # i == 0 starts a new trajectory
    solver.step(fake_velocity(x_init, 0.5, a, b), 0, x_init)
    solver.reset()
    assert solver.state.next_index == 0 and solver.state.x0_preds == []
    assert torch.equal(loop(), first)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_dtypes_round_trip(name):
    a, b, x = _latent_case(6, shape=(1, 4, 2, 3, 3))
    v = fake_velocity(x, 0.9, a, b)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        solver = make_solver(name, 4, 5.0)
        ref = make_solver(name, 4, 5.0)
        xs, vs = x.to(dtype), v.to(dtype)
        out = solver.step(vs, 0, xs)
        assert out.dtype == dtype and out.shape == x.shape
        # low precision inputs are upcast: same as the float32 math cast back
        if dtype != torch.float64:
            assert torch.equal(out, ref.step(vs.float(), 0, xs.float()).to(dtype))


# --------------------------------------------------------------------------- (5) bad input


def test_unknown_solver_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        make_solver("ddim", 10, 5.0)
    for valid in SOLVER_NAMES:
        assert valid in str(info.value)
    with pytest.raises(ValueError):
        make_solver("UniPC", 10, 5.0)


@pytest.mark.parametrize("fn", [unipc_sigmas, dpm_sigmas, euler_sigmas, lambda n, s: make_solver("unipc", n, s)])
def test_bad_steps_and_shift(fn):
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_steps"):
            fn(n, 5.0)
    for n in (2.5, True, "10"):
        with pytest.raises(TypeError, match="num_steps"):
            fn(n, 5.0)
    for s in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift"):
            fn(10, s)
    with pytest.raises(TypeError, match="shift"):
        fn(10, "5")


def test_shift_sigmas_rejects_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(torch.tensor([0.5]), 0.0)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(0.5, -2.0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_step_rejects_misuse(name):
    solver = make_solver(name, 5, 5.0)
    x = torch.randn(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="out of range"):
        solver.step(x, 5, x)
    with pytest.raises(ValueError, match="out of range"):
        solver.step(x, -1, x)
    with pytest.raises(ValueError, match="shape"):
        solver.step(x[..., :2], 0, x)
    with pytest.raises(TypeError):
        solver.step(x, 0, x.to(torch.int64))
    with pytest.raises(TypeError):
        solver.step(x, 1.0, x)
    x1 = solver.step(x, 0, x)
    with pytest.raises(ValueError, match="in order"):
        solver.step(x1, 2, x1)  # skipped step 1
    solver.step(x1, 1, x1)  # the state was not corrupted by the refused call
    assert solver.state.next_index == 2
    fresh = make_solver(name, 5, 5.0)
    with pytest.raises(ValueError, match="in order"):
        fresh.step(x, 1, x)  # must start at 0


# --------------------------------------------------------------------------- (6) buffers: no allocation per step


def reference_step(solver, hist: dict, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
    """The solvers' update as plain (allocating) tensor expressions, as before the buffers.

    Uses the solver's own precomputed float plan; ``hist`` carries the x0 history and UniPC's
    last sample (reset at i == 0).
    """
    if i == 0:
        hist.clear()
        hist["x0"] = []
    work = torch.promote_types(x.dtype, torch.float32)
    sample_dtype = x.dtype
    v, x = v.to(work), x.to(work)
    if isinstance(solver, EulerSolver):
        out = x + solver._dt[i] * v
    elif isinstance(solver, LCMSolver):
        if i == 0:
            hist["gen"] = torch.Generator().manual_seed(solver.seed + 1)
        x0 = x - float(solver.sigmas[i]) * v
        nxt = float(solver.sigmas[i + 1])
        out = x0 if nxt == 0 else (1 - nxt) * x0 + nxt * torch.randn(x.shape, generator=hist["gen"], dtype=work)
    else:
        x0 = x - float(solver.sigmas[i]) * v
        if isinstance(solver, DPMSolver):
            hist["x0"] = (hist["x0"] + [x0])[-2:]
            c = solver._coef[i]
            out = c.c_x * x - c.c_d0 * x0
            if c.order == 2:
                out = out - c.c_half * (c.c_d1 * (x0 - hist["x0"][-2]))
        else:
            assert isinstance(solver, UniPCSolver)
            if i > 0:
                c = solver._corr[i]
                m0 = hist["x0"][-1]
                base = c.c_x * hist["last"] - c.c_m0 * m0
                d1_t = x0 - m0
                if c.order == 1:
                    x = base - c.c_res * (c.rho[0] * d1_t)
                else:
                    d1 = (hist["x0"][-2] - m0) / c.rk
                    x = base - c.c_res * (c.rho[0] * d1 + c.rho[1] * d1_t)
            hist["x0"] = (hist["x0"] + [x0])[-2:]
            hist["last"] = x
            p = solver._pred[i]
            out = p.c_x * x - p.c_m0 * x0
            if p.order == 2:
                d1 = (hist["x0"][-2] - x0) / p.rk
                out = out - p.c_res * (0.5 * d1)
    return out.to(sample_dtype)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 12, 50])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_buffered_step_matches_reference_expressions(name, n, dtype):
    """Random velocities; every output within 1e-6 relative of the old expressions (in fact equal)."""
    g = torch.Generator().manual_seed(11)
    solver = make_solver(name, n, 5.0)
    hist: dict = {}
    shape = (1, 16, 3, 6, 10)
    worst = 0.0
    trajectories = 12 if n == 1 else 2  # >= 12 random steps for every schedule, buffers reused across runs
    for _ in range(trajectories):
        x = torch.randn(shape, generator=g).to(dtype)
        y = x.clone()
        for i in range(n):
            v = torch.randn(shape, generator=g).to(dtype)
            x = solver.step(v, i, x)
            y = reference_step(solver, hist, v, i, y)
            assert x.dtype == dtype and x.shape == shape
            worst = max(worst, _rel_err(x, y))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_buffered_step_matches_reference_on_strided_and_mixed_inputs(name):
    """Non-contiguous samples, velocity in another dtype than the sample, float16 samples."""
    g = torch.Generator().manual_seed(12)
    n = 10
    for sample_dtype, velocity_dtype in ((torch.float32, torch.bfloat16), (torch.float16, torch.float32)):
        solver = make_solver(name, n, 3.0)
        hist: dict = {}
        x = torch.randn(1, 6, 5, 16, generator=g).to(sample_dtype).transpose(1, 3)  # not contiguous
        y = x.clone()
        for i in range(n):
            v = torch.randn(x.shape, generator=g).to(velocity_dtype)
            x = solver.step(v, i, x)
            y = reference_step(solver, hist, v, i, y)
            assert x.dtype == sample_dtype
            assert _rel_err(x, y) < 1e-6


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_step_does_not_modify_its_inputs(name):
    g = torch.Generator().manual_seed(13)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        solver = make_solver(name, 8, 5.0)
        x = torch.randn(2, 4, 3, 5, generator=g).to(dtype)
        for i in range(8):
            v = torch.randn(x.shape, generator=g).to(dtype)
            x_before, v_before = x.clone(), v.clone()
            out = solver.step(v, i, x)
            assert torch.equal(x, x_before) and torch.equal(v, v_before)
            assert out.data_ptr() not in (x.data_ptr(), v.data_ptr())
            x = out


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_no_new_buffers_after_the_first_two_steps(name):
    """From step 2 on, every returned tensor and every state tensor is one of the fixed buffers."""
    n = 20
    solver = make_solver(name, n, 5.0)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    vs = [torch.randn(x.shape, generator=g) for _ in range(n)]
    returned, state_ptrs, buffer_sets = [], set(), set()
    for run in range(2):  # the second trajectory reuses the first one's buffers
        x = torch.randn(1, 16, 2, 4, 6, generator=g)
        for i in range(n):
            x = solver.step(vs[i], i, x)
            b = solver.state.buffers
            assert x is b.outputs[i % 2]  # step i writes outputs[i % 2]
            if run == 0 and i < 2:
                continue
            returned.append(_ptr(x))
            buffer_sets.add(tuple(_ptr(t) for t in b.tensors()))
            state_ptrs.update(_ptr(t) for t in solver.state.x0_preds)
            if solver.state.last_sample is not None:
                state_ptrs.add(_ptr(solver.state.last_sample))
    assert len(buffer_sets) == 1  # the same buffers at every step
    (fixed,) = buffer_sets
    assert len(set(fixed)) == len(fixed)  # distinct buffers
    outputs = set(fixed[:2])
    assert set(returned) == outputs and len(outputs) == 2
    assert returned[: n - 2] == [fixed[i % 2] for i in range(2, n)]
    assert state_ptrs <= set(fixed) - outputs  # history lives in the ring / last-sample buffers
    expected = {"euler": 2, "dpm++": 5, "unipc": 6, "lcm": 5}[name]  # outputs (+ x0 ring, scratch, last sample)
    assert len(fixed) == expected


def _allocations(prof) -> list[int]:
    """Sizes of all CPU allocator allocations seen by the profiler (raw events, not netted per op)."""
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None or not hasattr(results, "events"):
        pytest.skip("this torch.profiler does not expose raw memory events")
    return [e.nbytes() for e in results.events() if e.name() == "[memory]" and e.nbytes() > 0]


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_profiler_sees_no_tensor_allocation_in_steps_after_the_second(name):
    """torch.profiler(profile_memory=True) around steps 3..N: no allocation bigger than 8 bytes.

    The only allocations left are the 8-byte CPU tensors into which PyTorch's argument parser
    wraps a Python-float operand (``torch.mul(x, c, out=buf)``), plus on CPU a 4-byte float32
    cast of it; the coefficients stay Python floats by design. No buffer-sized allocation.
    """
    from torch.profiler import ProfilerActivity, profile

    n = 16
    shape = (1, 16, 2, 4, 6)  # 768 elements: a buffer is 3072 bytes
    g = torch.Generator().manual_seed(15)
    x0 = torch.randn(shape, generator=g)
    vs = [torch.randn(shape, generator=g) for _ in range(n)]
    solver = make_solver(name, n, 5.0)
    x = x0.clone()
    for i in range(3):
        x = solver.step(vs[i], i, x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(3, n):
            x = solver.step(vs[i], i, x)
    allocs = _allocations(prof)
    assert all(size <= 8 for size in allocs), sorted(set(allocs))
    # control: the profiler does see the buffers a fresh solver allocates at its first step
    fresh = make_solver(name, n, 5.0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fresh.step(vs[0], 0, x0)
    host = 1 if name == "lcm" else 0  # lcm's CPU noise buffer (the draw is on the CPU whatever the device)
    assert sum(size >= 4 * x0.numel() for size in _allocations(prof)) == len(fresh.state.buffers.tensors()) + host


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_returned_tensor_is_valid_until_the_step_after_next(name):
    solver = make_solver(name, 6, 5.0)
    a, b, x = _latent_case(16)
    outs = []
    for i in range(6):
        x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
        outs.append((x, x.clone()))
        if i >= 1:  # the previous output survived this step
            prev, prev_copy = outs[i - 1]
            assert torch.equal(prev, prev_copy)
        if i >= 2:  # the one before was overwritten: it is this step's buffer
            assert outs[i - 2][0] is x


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_reuse_and_reset_with_kept_results(name):
    """Like test_reuse_and_reset_give_identical_trajectories, but with the results cloned, since
    the returned tensors are solver buffers that later runs overwrite."""
    solver = make_solver(name, 8, 5.0)
    a, b, x_init = _latent_case(5)

    def loop(x):
        for i in range(8):
            x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
        return x

    first = loop(x_init).clone()
    assert torch.equal(loop(x_init), first)
    solver.step(fake_velocity(x_init, 0.5, a, b), 0, x_init)
    solver.reset()
    assert solver.state.buffers is not None and solver.state.last_sample is None
    assert torch.equal(loop(x_init), first)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_new_run_may_start_from_the_buffer_its_step_0_would_write(name):
    """7 steps end in outputs[0]; a run started from that tensor gets step 0 written elsewhere."""
    n = 7
    a, b, x_init = _latent_case(17)

    def loop(solver, x):
        for i in range(n):
            x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
        return x

    solver = make_solver(name, n, 5.0)
    final = loop(solver, x_init)
    assert final is solver.state.buffers.outputs[0]
    expected = loop(make_solver(name, n, 5.0), final.clone())
    kept = final.clone()
    v0 = fake_velocity(final, float(solver.sigmas[0]), a, b)
    out0 = solver.step(v0, 0, final)
    assert out0 is solver.state.buffers.outputs[1] and torch.equal(final, kept)
    with pytest.raises(ValueError, match="both output buffers"):
        solver.step(out0, 0, final)  # sample and velocity in the two outputs: refused, nothing written
    assert torch.equal(final, kept)
    assert torch.equal(loop(solver, final), expected)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_buffers_follow_shape_and_dtype_changes_between_runs(name):
    solver = make_solver(name, 4, 5.0)
    g = torch.Generator().manual_seed(18)
    for shape, dtype in [((1, 4, 2, 3), torch.float32), ((1, 4, 2, 5), torch.float32), ((1, 4, 2, 5), torch.bfloat16)]:
        ref = make_solver(name, 4, 5.0)
        x = y = torch.randn(shape, generator=g).to(dtype)
        for i in range(4):
            v = torch.randn(shape, generator=g).to(dtype)
            x = solver.step(v, i, x)
            y = ref.step(v, i, y)
            assert torch.equal(x, y) and x.dtype == dtype
        b = solver.state.buffers
        assert b.shape == shape and b.out_dtype == dtype and b.work_dtype == torch.float32
        assert (b.result is not None) == (dtype != torch.float32)
    x = solver.step(torch.ones(1, 4, 2, 5), 0, torch.ones(1, 4, 2, 5))
    for bad in (torch.zeros(1, 4, 2, 6), torch.zeros(1, 4, 2, 5, dtype=torch.float64)):
        with pytest.raises(ValueError, match="changed within a trajectory"):
            solver.step(bad, 1, bad)
    assert solver.state.next_index == 1  # the refused calls did not touch the state
    solver.step(x, 1, x)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_buffers_work_inside_and_outside_inference_mode(name):
    a, b, x_init = _latent_case(19)
    solver = make_solver(name, 4, 5.0)
    with torch.inference_mode():
        x = x_init.clone()
        for i in range(4):
            x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
        inside = x.clone()
    assert not any(t.is_inference() for t in solver.state.buffers.tensors())
    x = x_init
    for i in range(4):  # outside inference mode, into the buffers allocated inside it
        x = solver.step(fake_velocity(x, float(solver.sigmas[i]), a, b), i, x)
    assert torch.equal(x, inside)
