"""Per-block solvers: turn a block's flow prediction at sigma_in into its latents at sigma_out.

Convention (engine-wide): x_sigma = (1 - sigma) x0 + sigma noise, flow v = noise - x0, so
x0 = x - sigma v. Every frame of a block is at the same step, so solver state (UniPC's multistep
history) is kept per block and released once the block has taken its last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.plan.sigmas import Schedule
from engine.plan.timeline import Work
from engine.sampling.noise import NoiseSource


class Solver:
    """`step(work, x, flow)` -> latents at work.sigma_out (x0 after the block's last step)."""

    def step(self, work: Work, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def release(self, block: int) -> None:
        """Forget any state kept for `block` (it has finished)."""


class SelfForcingSolver(Solver):
    """Predict x0, then re-noise it to the next level with fresh noise (Self-Forcing, CausVid)."""

    def __init__(self, schedule: Schedule, noise: NoiseSource):
        self.schedule = schedule
        self.noise = noise

    def step(self, work: Work, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        x0 = x - work.sigma_in * flow
        if work.last:
            return x0
        fresh = self.noise.noise(tuple(x.shape), work.block, work.step + 1, x.device)
        return (1.0 - work.sigma_out) * x0 + work.sigma_out * fresh


class EulerSolver(Solver):
    """One Euler step of the flow ODE: x + (sigma_out - sigma_in) v."""

    def step(self, work: Work, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return x + (work.sigma_out - work.sigma_in) * flow


@dataclass
class _History:
    outputs: list[torch.Tensor] = field(default_factory=list)  # recent x0 predictions, newest last
    last_sample: torch.Tensor | None = None  # input of the previous predictor step


@dataclass(frozen=True)
class _Step:
    """UniPC coefficients of one step i (sigma_i -> sigma_{i+1}), as exact float32 values."""

    order: int  # predictor order: 2, or 1 while the history fills and on the final step
    ratio: float  # sigma_{i+1} / sigma_i
    weight: float  # alpha_{i+1} * expm1(-h), h = lambda_{i+1} - lambda_i  (also B(h) * alpha)
    rk: float  # (lambda_{i-1} - lambda_i) / h, used when order == 2
    rhos: tuple[float, ...]  # corrector weights for the step after this one (UniC of order `order`)


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    # lambda = log(alpha) - log(sigma) with alpha = 1 - sigma (flow matching)
    return torch.log(1 - sigma) - torch.log(sigma)


def _unipc_steps(sigmas: torch.Tensor, max_order: int) -> list[_Step]:
    """Coefficients for every step, computed once in float32 with the operation order of
    diffusers' UniPCMultistepScheduler so that results match it to the last bit."""
    steps, table = len(sigmas) - 1, []
    for i in range(steps):
        order = min(max_order, steps - i, i + 1)
        sigma_t, sigma_s0 = sigmas[i + 1], sigmas[i]
        h = _log_snr(sigma_t) - _log_snr(sigma_s0)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        rk = (_log_snr(sigmas[i - 1]) - _log_snr(sigma_s0)) / h if order == 2 else torch.ones(())
        table.append(
            _Step(
                order,
                (sigma_t / sigma_s0).item(),
                ((1 - sigma_t) * h_phi_1).item(),
                rk.item(),
                _corrector_weights(rk, hh, h_phi_1, order),
            )
        )
    return table


def _corrector_weights(rk: torch.Tensor, hh: torch.Tensor, h_phi_1: torch.Tensor, order: int) -> tuple[float, ...]:
    if order == 1:
        return (0.5,)
    rks = torch.stack([rk, torch.ones(())])
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return tuple(torch.linalg.solve(torch.stack(rows), torch.stack(b)).tolist())


class UniPCSolver(Solver):
    """UniPC (B(h) = expm1(h), x0 prediction) for flow models, order 1-2, history per block.

    Matches diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True)` with its defaults (solver_order 2, bh2, lower_order_final), which
    SkyReels-V2 steps once per frame; here one state serves all frames of a block.
    Step i: x0 = x - sigma_i v; the corrector (UniC) first refines x with the new x0 using the
    previous step's coefficients, then the predictor (UniP) moves to sigma_{i+1}.
    """

    def __init__(self, schedule: Schedule, order: int = 2, *, skyreels_alias: bool = False):
        if order not in (1, 2):
            raise ValueError("UniPC order must be 1 or 2")
        # SkyReels-V2's pipelines (original and diffusers) hand each frame's scheduler a view of
        # their latents and then overwrite that view with the step's result; the scheduler keeps
        # the view as `last_sample`, so the corrector of step 1 reads x_1 instead of x_0 (later
        # correctors get fresh tensors and are unaffected). Reproduced on request, to match them.
        self.skyreels_alias = skyreels_alias
        self.sigmas = [float(s) for s in torch.tensor(schedule.sigmas, dtype=torch.float32)]
        self.table = _unipc_steps(torch.tensor(schedule.sigmas, dtype=torch.float32), order)
        self._history: dict[int, _History] = {}

    def release(self, block: int) -> None:
        self._history.pop(block, None)

    def step(self, work: Work, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        state = self._history.setdefault(work.block, _History())
        i = work.step
        x0 = x - self.sigmas[i] * flow
        if state.last_sample is not None:
            x = self._correct(self.table[i - 1], state, x0)
        state.outputs = (state.outputs + [x0])[-2:]
        state.last_sample = x
        x_next = self._predict(self.table[i], state, x)
        if self.skyreels_alias and i == 0:
            state.last_sample = x_next
        if i + 1 == len(self.table):
            self.release(work.block)
        return x_next

    @staticmethod
    def _predict(c: _Step, state: _History, x: torch.Tensor) -> torch.Tensor:
        m0 = state.outputs[-1]
        x_t = c.ratio * x - c.weight * m0
        if c.order == 2:
            x_t = x_t - c.weight * (0.5 * ((state.outputs[-2] - m0) / c.rk))  # rho_p = 1/2
        return x_t

    @staticmethod
    def _correct(c: _Step, state: _History, model_t: torch.Tensor) -> torch.Tensor:
        """UniC with the previous step's coefficients: x_i from x_{i-1}, old and new x0."""
        m0 = state.outputs[-1]
        residual = c.rhos[-1] * (model_t - m0)
        if c.order == 2:
            residual = c.rhos[0] * ((state.outputs[-2] - m0) / c.rk) + residual
        return c.ratio * state.last_sample - c.weight * m0 - c.weight * residual


def make_solver(name: str, schedule: Schedule, noise: NoiseSource) -> Solver:
    if name == "self-forcing":
        return SelfForcingSolver(schedule, noise)
    if name == "euler":
        return EulerSolver()
    if name == "unipc":
        return UniPCSolver(schedule)
    if name == "unipc-skyreels":
        return UniPCSolver(schedule, skyreels_alias=True)
    raise ValueError(f"unknown solver {name!r}")
