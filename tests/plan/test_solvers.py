"""Schedules and per-block solvers, checked against diffusers' UniPC and the plain formulas.

pytest tests/plan/test_solvers.py
"""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from engine.config import SamplingConfig
from engine.plan.sigmas import build_schedule
from engine.plan.timeline import make_work
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import EulerSolver, SelfForcingSolver, UniPCSolver

FLOW_CASES = [(30, 8.0), (4, 8.0), (2, 8.0), (50, 5.0), (7, 1.0), (1, 3.0)]


def _flow_schedule(steps, shift):
    return build_schedule(SamplingConfig(timesteps=None, num_steps=steps, shift=shift, solver="unipc"))


def _reference(steps, shift):
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps,shift", FLOW_CASES)
def test_flow_schedule_equals_diffusers(steps, shift):
    ours, reference = _flow_schedule(steps, shift), _reference(steps, shift)
    assert [int(t) for t in ours.model_t] == reference.timesteps.tolist()
    assert list(ours.sigmas) == reference.sigmas.tolist()


def test_explicit_schedules():
    self_forcing = build_schedule(SamplingConfig())
    assert [round(t, 2) for t in self_forcing.model_t] == [1000.0, 937.5, 833.33, 625.0]
    assert self_forcing.sigmas[-1] == 0.0 and self_forcing.noise_t == 1000.0
    causvid = build_schedule(SamplingConfig(timesteps=(1000.0, 757.0, 522.0), shift=8.0, warp=False))
    assert causvid.sigmas == (1.0, 0.757, 0.522, 0.0)


def _flows(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("steps,shift", FLOW_CASES)
def test_unipc_is_bit_identical_to_diffusers(steps, shift):
    schedule, reference = _flow_schedule(steps, shift), _reference(steps, shift)
    solver = UniPCSolver(schedule)
    x = x_ref = torch.randn(1, 4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for i, (t, flow) in enumerate(zip(reference.timesteps, _flows(x.shape, steps))):
        flow = flow + 0.3 * x  # a flow that depends on the state, as a model's does
        x_ref = reference.step(flow, t, x_ref, return_dict=False)[0]
        x = solver.step(make_work(schedule, 0, i), x, flow)
        assert torch.equal(x, x_ref), f"step {i}: max diff {(x - x_ref).abs().max():.3e}"


@pytest.mark.parametrize("steps,shift", [(30, 8.0), (4, 8.0)])
def test_skyreels_variant_matches_how_the_pipelines_step(steps, shift):
    """SkyReels' pipelines step one scheduler per frame on a view of their latents and then write
    the result into that view: our per-block solver with skyreels_alias reproduces it exactly."""
    schedule = _flow_schedule(steps, shift)
    latents = torch.randn(1, 4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    frame_schedulers = [_reference(steps, shift) for _ in range(3)]
    ours, plain = UniPCSolver(schedule, skyreels_alias=True), UniPCSolver(schedule)
    x = y = latents.clone()
    for i, (t, flow) in enumerate(zip(frame_schedulers[0].timesteps, _flows(latents.shape, steps, seed=3))):
        for f, scheduler in enumerate(frame_schedulers):
            latents[:, :, f] = scheduler.step(flow[:, :, f], t, latents[:, :, f], return_dict=False)[0]
        x = ours.step(make_work(schedule, 0, i), x, flow)
        y = plain.step(make_work(schedule, 0, i), y, flow)
        assert torch.equal(x, latents), f"step {i}: max diff {(x - latents).abs().max():.3e}"
    assert not torch.equal(x, y), "the variant must differ from textbook UniPC"


def test_unipc_keeps_history_per_block():
    schedule = _flow_schedule(5, 8.0)
    solver, alone = UniPCSolver(schedule), UniPCSolver(schedule)
    a = b = c = torch.randn(1, 2, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    for i, flow in enumerate(_flows(a.shape, 5, seed=5)):
        a = solver.step(make_work(schedule, 0, i), a, flow)
        b = solver.step(make_work(schedule, 1, i), b, -flow)  # interleaved with another block
        c = alone.step(make_work(schedule, 0, i), c, flow)
    assert torch.equal(a, c)
    assert solver._history == {}, "state is released after the last step"


def test_euler_and_self_forcing_steps():
    schedule = build_schedule(SamplingConfig())
    x, flow = torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 3, 4, 4)
    work = make_work(schedule, 2, 1)
    assert torch.equal(EulerSolver().step(work, x, flow), x + (work.sigma_out - work.sigma_in) * flow)
    noise = NoiseSource(7)
    renoised = SelfForcingSolver(schedule, noise).step(work, x, flow)
    x0 = x - work.sigma_in * flow
    assert torch.allclose(renoised, (1 - work.sigma_out) * x0 + work.sigma_out * noise.noise(x.shape, 2, 2))
    last = make_work(schedule, 2, schedule.steps - 1)
    assert torch.equal(SelfForcingSolver(schedule, noise).step(last, x, flow), x - last.sigma_in * flow)


def test_noise_is_addressed_not_ordered():
    noise = NoiseSource(seed=9)
    a = noise.noise((2, 3), block=5, step=1)
    noise.noise((2, 3), block=0, step=0)
    assert torch.equal(noise.noise((2, 3), block=5, step=1), a)
    assert not torch.equal(noise.noise((2, 3), block=5, step=2), a)
    assert not torch.equal(NoiseSource(seed=10).noise((2, 3), block=5, step=1), a)
    assert not torch.equal(noise.fork(1).noise((2, 3), block=5, step=1), a)
