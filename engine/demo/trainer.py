"""The demo's training loop as an object whose whole state can be saved and restored exactly.

One step: a diffusion-forcing batch of ground-truth clips (any context state: clean, partly
denoised, noise) plus, when rollout streams are on, one self-generated block per stream trained
against its ground-truth continuation (`engine.demo.rollout`); one AdamW step on the sum; the EMA;
then the streams commit their new blocks. `state_dict()` holds everything the next step depends
on (weights, optimizer, EMA, step, numpy and torch random states, the streams), so a run stopped
after any step and resumed from its checkpoint continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engine.config import Preset
from engine.demo.pixels import PatchCodec
from engine.demo.rollout import RolloutConfig, RolloutPool, RolloutView, refined, rollout_loss, sample_block
from engine.demo.training import (
    EMA,
    TrainConfig,
    block_sigmas,
    color_readout,
    context_first,
    diffusion_forcing_loss,
    fit_codec,
    learning_rate,
    make_batch,
    near_shape,
    pyramid_sigmas,
    shape_weights_from,
)
from engine.demo.vocab import VocabEncoder
from engine.models.checkpoints.wan import load_weights
from engine.models.random_init import init_random_
from engine.models.rope import Rope
from engine.models.wan import WanModel
from engine.plan.sigmas import build_schedule
from engine.weight_paths import BUNDLED_FILES


def build_model(preset: Preset, cfg: TrainConfig, device, init: Path | None) -> tuple[WanModel, VocabEncoder]:
    """Fresh weights (the head starts at zero flow everywhere), or those saved in `init`."""
    torch.manual_seed(cfg.seed)
    model = WanModel(preset.model)
    if init is None:
        init_random_(model, cfg.seed)
        with torch.no_grad():
            model.head.head.weight.zero_()
            model.head.head.bias.zero_()
        words = VocabEncoder.create(preset.text.vocab, preset.text.text_len, preset.model.text_dim)
    else:
        load_weights(model, init / BUNDLED_FILES["transformer"])
        words = VocabEncoder.load(init / BUNDLED_FILES["text_encoder"], preset.text.vocab, preset.text.text_len)
    return model.to(device).train(), VocabEncoder(words.vocab, words.text_len, words.module.to(device).train(), device)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels `[B, 3, F, H, W]` in [-1, 1] -> uint8 `[B, F, H, W, 3]`."""
    return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


class Trainer:
    def __init__(self, preset: Preset, cfg: TrainConfig, device: torch.device, init: Path | None = None):
        if cfg.timesteps:  # train for another sampler than the preset's
            preset = dataclasses.replace(preset, sampling=dataclasses.replace(preset.sampling, timesteps=cfg.timesteps))
        self.preset, self.cfg, self.device = preset, cfg, device
        if init is None:
            self.codec = fit_codec(preset, cfg)
        else:
            self.codec = PatchCodec.load(init / BUNDLED_FILES["vae"], preset.vae.patch)
        self.colors = color_readout(self.codec, cfg.color_weight)  # [3, k] or None
        self.model, self.words = build_model(preset, cfg, device, init)
        self.params = list(self.model.parameters()) + list(self.words.module.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.ema = EMA([self.model, self.words.module], cfg.ema)
        self.rope = Rope(preset.model, (preset.latent_hw[0] // 2, preset.latent_hw[1] // 2), device)
        self.rng, self.generator = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
        self.block = preset.stream.frames_per_block
        self.sigmas = build_schedule(preset.sampling).sigmas  # the sampler's levels, ending at 0
        self.grid = cfg.grid or self.sigmas[:-1]
        self.teacher = None  # (model, words, sigmas ending at 0): rollout targets from the EMA weights' long sampler
        if cfg.teacher_share and cfg.teacher_timesteps:
            ladder = build_schedule(dataclasses.replace(preset.sampling, timesteps=cfg.teacher_timesteps)).sigmas
            model, module = (copy.deepcopy(m).eval().requires_grad_(False) for m in (self.model, self.words.module))
            words = VocabEncoder(self.words.vocab, self.words.text_len, module, device)
            self.teacher = (model, words, tuple(ladder))
        self.step = 0
        self.seconds = 0.0
        self.losses: dict[str, list[float]] = {"total": [], "diffusion_forcing": [], "rollout": []}
        self.pool = None
        if cfg.rollout_streams:
            self.pool = RolloutPool(self._rollout_config(), self.model, self.codec, preset.stream.height, self.block,
                                    preset.stream.window_frames - self.block, self.rope)  # fmt: skip
            for stream in range(cfg.rollout_streams):
                self.pool.start(stream, self.rng, self._commit_truth)

    def _rollout_config(self) -> RolloutConfig:
        c = self.cfg
        return RolloutConfig(c.rollout_streams, c.rollout_min_blocks, c.rollout_max_blocks, c.own_start,
                             c.own_input, c.rollout_switch, c.prefix_blocks)  # fmt: skip

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _text(self, prompts: list[str]):
        return self.model.embed_text(self.words.states(prompts))

    @torch.no_grad()
    def _commit_truth(self, latents: torch.Tensor, prompt: str, stream: int) -> None:
        """A ground-truth first block committed to one stream by a commit pass at sigma 0."""
        view: RolloutView = self.pool.view([stream], record=True)
        with self._autocast():
            self.model(latents, torch.zeros(1, latents.shape[2], device=self.device), self._text([prompt]), view)
        self.pool.append([k for k, _ in view.recorded], [v for _, v in view.recorded], [stream])

    def _diffusion_forcing(self) -> torch.Tensor:
        cfg = self.cfg
        batch = make_batch(self.preset, cfg, self.codec, self.rng)
        sigma = block_sigmas(
            cfg.batch, cfg.clip_blocks, self.block, cfg.clean_share, self.generator, self.grid, cfg.grid_share
        )
        if cfg.pyramid_share:  # no draws at 0, so runs without it keep their random streams
            sigma = pyramid_sigmas(sigma, self.sigmas, self.block, cfg.pyramid_share, self.generator)
        sigma = context_first(sigma, batch.mid_stream, self.block)
        noise = torch.randn(batch.latents.shape, generator=self.generator)
        batch, sigma, noise = batch.to(self.device), sigma.to(self.device), noise.to(self.device)
        return diffusion_forcing_loss(self.model, self.words, self.rope, batch, sigma, noise, self.block, self.colors)

    def _rollout(self) -> tuple[torch.Tensor, tuple]:
        """The streams' next blocks: generated as inference would, and trained against the truth."""
        pool = self.pool
        truth, before, prompts, after = pool.targets(self.rng)
        latents = self.codec.encode(truth, self.device)  # [B, C, F, h, w]
        frames = np.concatenate([before[:, None], truth], axis=1)  # the frame before shows where it was
        near = near_shape(frames, self.codec.patch)[:, 1:]  # [B, F, h, w]
        weights = shape_weights_from(near, self.cfg.shape_weight)
        weights = (weights * pool.switch_boost(self.cfg.switch_weight)[:, None, None, None]).to(self.device)
        shape, model = tuple(latents.shape), self.model
        with torch.no_grad():
            x0, inputs, recorded = sample_block(model, self._text(prompts), pool, self.sigmas, self.generator, shape)
        text = self._text(prompts)
        teach = None
        if self.teacher is not None:  # where: [B, 1, F, h, w], the latent pixels the teacher's output is the target of
            if self.cfg.teacher_region == "shape":  # near the shape; the background keeps the truth
                where = near.to(self.device)
            else:
                where = torch.ones_like(weights, dtype=torch.bool)
            teach = (self._teacher(prompts), self.cfg.teacher_share, where[:, None])
        loss = rollout_loss(self.model, text, pool, latents, inputs, weights, self.sigmas, self.generator, self.colors,
                            teach)  # fmt: skip
        return loss, (x0, recorded, after)

    @torch.no_grad()
    def _teacher(self, prompts: list[str]):
        """x -> x0 by the long sampler of a mean teacher: a moving average of the trained weights at
        the EMA's decay from the first step (the saved EMA warms up, so early on it is the trained
        weights, and with those as their own teacher the targets chased the predictions and a run
        diverged within 40 steps). It reads the streams' context K/V, which the trained weights committed."""
        model, words, ladder = self.teacher
        for param, trained in zip([*model.parameters(), *words.module.parameters()], self.params):
            param.lerp_(trained.detach(), 1 - self.cfg.ema)
        text = model.embed_text(words.states(prompts))
        return lambda x, sigma: refined(model, text, self.pool.view(), x, sigma, ladder, self.generator)

    def _commit_rollout(self, pending: tuple) -> None:
        x0, recorded, after = pending
        streams = list(range(self.cfg.rollout_streams))
        self.pool.append([k for k, _ in recorded], [v for _, v in recorded], streams)
        generated = to_uint8(self.codec.decode(x0))
        for stream in self.pool.advance(generated, after):
            self.pool.start(stream, self.rng, self._commit_truth)

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, cfg)
        parts, pending = {}, None
        with self._autocast():
            if cfg.batch:
                parts["diffusion_forcing"] = self._diffusion_forcing()
            if self.pool is not None:
                parts["rollout"], pending = self._rollout()
        loss = parts.get("diffusion_forcing", 0.0) + cfg.rollout_weight * parts.get("rollout", 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.ema.update()
        if pending is not None:
            self._commit_rollout(pending)
        self.step += 1
        values = {"total": loss.item(), **{k: v.item() for k, v in parts.items()}}
        for name, value in values.items():
            self.losses[name].append(value)
        self.seconds += time.perf_counter() - start
        return values

    # -- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "step": self.step,
            "seconds": self.seconds,
            "losses": self.losses,
            "model": self.model.state_dict(),
            "words": self.words.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": {"shadow": self.ema.shadow, "updates": self.ema.updates},
            "numpy": self.rng.bit_generator.state,
            "torch": self.generator.get_state(),
            "torch_global": torch.get_rng_state(),
            "pool": None if self.pool is None else self.pool.state_dict(),
            "teacher": None if self.teacher is None else [m.state_dict() for m in self._teacher_modules()],
            "codec": {k: getattr(self.codec, k) for k in ("patch_mean", "basis", "latent_mean", "latent_std")},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.cfg):
            raise ValueError("the checkpoint was made with another training configuration")
        self.step, self.seconds, self.losses = state["step"], state["seconds"], state["losses"]
        self.model.load_state_dict(state["model"])
        self.words.module.load_state_dict(state["words"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for shadow, saved in zip(self.ema.shadow, state["ema"]["shadow"]):
                shadow.copy_(saved)
        self.ema.updates = state["ema"]["updates"]
        self.rng.bit_generator.state = state["numpy"]
        self.generator.set_state(state["torch"])
        torch.set_rng_state(state["torch_global"])
        self.codec = PatchCodec(self.codec.patch, state["codec"])
        self.colors = color_readout(self.codec, self.cfg.color_weight)
        if self.pool is not None:
            self.pool.codec = self.codec
            self.pool.load_state_dict(state["pool"])
        if self.teacher is not None:
            for module, saved in zip(self._teacher_modules(), state["teacher"]):
                module.load_state_dict(saved)

    def _teacher_modules(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.teacher[0], self.teacher[1].module

    def save(self, path: Path) -> None:
        """Write the state atomically (a stopped write leaves the previous checkpoint intact)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(self.state_dict(), partial)
        partial.replace(path)

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
