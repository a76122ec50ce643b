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
    UniPCSolver,
    dpm_sigmas,
    euler_sigmas,
    make_solver,
    shift_sigmas,
    unipc_sigmas,
)

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


@pytest.mark.parametrize("name", SOLVER_NAMES)
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
    errs = {(name, shift): [flow.error(name, n, shift) for n in ns] for name in SOLVER_NAMES for shift in (1.0, 5.0)}
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
