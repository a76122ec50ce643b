"""Flow-matching schedulers (UniPC, DPM++, Euler) as small explicit solvers for the denoising loop."""

from .schedulers import SOLVER_NAMES, make_solver

__all__ = ["SOLVER_NAMES", "make_solver"]
