"""Self-Forcing's loop and the stream's noise, checked with a model whose output is known.

    pytest tests/test_sampler.py
"""

import torch

from engine.config import SamplingConfig
from engine.noise import NoiseSource
from engine.sampler import Denoiser, self_forcing
from helpers import TINY, tiny_cache


class RecordingModel(torch.nn.Module):
    """flow = x (so x0 = (1 - sigma) x); records (first_frame, sigma, commit) of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, text, view):
        self.calls.append((view.first_frame, sigma[0, 0].item(), view.commit))
        return x.clone()


def test_loop_steps_renoises_and_commits():
    sampling = SamplingConfig()
    sigmas = sampling.sigmas()
    model, noise = RecordingModel(), NoiseSource(seed=4)
    cache = tiny_cache(TINY, (2, 2), sink=0, ring=6, scratch=3)
    shape = (1, 4, 3, 4, 4)
    blocks = list(self_forcing(Denoiser(model, cache, 3), text=lambda block: None, sampling=sampling, noise=noise, block_shape=shape, num_blocks=3))
    # 4 steps + a commit per block, but no commit after the last block
    expected_calls = []
    for b in range(3):
        expected_calls += [(3 * b, s, False) for s in sigmas]
        if b < 2:
            expected_calls.append((3 * b, 0.0, True))
    assert [(f, round(s, 6), c) for f, s, c in model.calls] == [(f, round(s, 6), c) for f, s, c in expected_calls]
    assert cache.committed == 6
    # With flow = x the last step gives x0 = (1 - sigma_last) * x_last, x_last built from step-3 noise.
    x = (1 - sigmas[2]) * ((1 - sigmas[1]) * ((1 - sigmas[0]) * noise.noise(shape, 1, 0)))
    for step in (1, 2, 3):
        x0 = (1 - sigmas[step - 1]) * x if step > 1 else (1 - sigmas[0]) * noise.noise(shape, 1, 0)
        x = (1 - sigmas[step]) * x0 + sigmas[step] * noise.noise(shape, 1, step)
    assert torch.allclose(blocks[1].latents, (1 - sigmas[3]) * x, atol=1e-6)


def test_warped_sigmas_match_self_forcing():
    sigmas = SamplingConfig().sigmas()
    assert [round(1000 * s, 2) for s in sigmas] == [1000.0, 937.5, 833.33, 625.0]
    causvid = SamplingConfig(timesteps=(1000.0, 757.0, 522.0), shift=8.0, warp=False).sigmas()
    assert causvid == [1.0, 0.757, 0.522]


def test_noise_is_addressed_not_ordered():
    noise = NoiseSource(seed=9)
    a = noise.noise((2, 3), block=5, step=1)
    noise.noise((2, 3), block=0, step=0)
    assert torch.equal(noise.noise((2, 3), block=5, step=1), a)
    assert not torch.equal(noise.noise((2, 3), block=5, step=2), a)
    assert not torch.equal(NoiseSource(seed=10).noise((2, 3), block=5, step=1), a)
