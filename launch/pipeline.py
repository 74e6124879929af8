"""The Python API: load a preset once, generate videos, stream with live prompt changes.

    from launch.pipeline import StreamingPipeline

    pipe = StreamingPipeline.from_preset("demo")                 # the shipped demo model
    fast = StreamingPipeline.from_preset("demo", compile="default")  # compiled forward (SpeedConfig)
    small = StreamingPipeline.from_preset("demo", weights="fp8", offload="layers", text_encoder_device="cpu")
    video = pipe.generate("a red circle moving left", blocks=8, seed=0)
    video.frames.shape, video.stats.forwards                     # [N, 64, 64, 3] uint8
    video.save("out/circle.mp4")

    pipe.enable_cache("flowcache", threshold=0.1)               # feature caching on
    pipe.set_plan(schedule="pyramid", offset=1)                  # blocks in flight at once
    stream = pipe.stream("a red circle moving left", seed=0)     # endless
    for chunk in stream:                                         # one block of frames at a time
        if chunk.index == 4:
            stream.set_prompt("a blue square moving up")         # lands at the next tick
        if chunk.index == 8:
            break

    clip = (frame for frame in my_frames)                          # uint8 [H, W, 3] each, or a FrameFeed
    for chunk in pipe.stream("a blue circle moving right", video_in=clip, strength=0.6):
        ...                                                          # restyled input; prompt-only once it ends

Settings change through calls, not by editing frozen presets; the model is loaded once.

A stream may start from pixels: `image=` (image-to-video) or `video=` (continue a clip), each a
path, the file's bytes, or uint8 frames `[T, H, W, 3]`. They are checked by content and size
(engine/media), center-cropped and resized to the preset's size, encoded by the family's VAE and
committed as the stream's first blocks. The given frames are not part of the output unless
`include_start=True` (then they come first, as the VAE gives them back):

    video = pipe.generate("a red circle moving left", blocks=6, video="clip.mp4")
    stream = pipe.stream("a red circle moving left", image="first_frame.png")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache import SUGGESTED_THRESHOLDS
from engine.config import CacheConfig, Preset, SpeedConfig
from engine.devices import resolve_device, resolve_dtype
from engine.media import MediaError, MediaLimits, load_image, load_video
from engine.runtime.outputs import RunStats
from engine.runtime.session import Run, Session
from engine.runtime.video_in import VideoIn
from engine.serving.protocol import clean_prompt
from engine.serving.video import Mp4Writer
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.presets import get_preset
from parallel.topology import Topology


@dataclass
class Video:
    frames: np.ndarray
    """`[N, H, W, 3]` uint8."""
    fps: int
    stats: RunStats

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with Mp4Writer(path, fps=self.fps, width=self.frames.shape[2], height=self.frames.shape[1]) as writer:
            writer.write(self.frames)
        return path


@dataclass
class Chunk:
    index: int
    """The block's index in the stream."""
    frames: np.ndarray
    """`[F, H, W, 3]` uint8: this block's frames."""
    prompt: str
    """The prompt in force when the block finished."""


def checked_prompt(prompt: str) -> str:
    """`prompt` as given, if a stream's viewers could send it (the one rule of every entry point,
    engine/serving/protocol.py's `clean_prompt`); else ValueError (ProtocolError) saying why."""
    clean_prompt(prompt)
    return prompt


Pixels = str | Path | bytes | np.ndarray
"""An image or clip: a path, the file's bytes, or uint8 frames `[T, H, W, 3]`."""


def given_frames(image: Pixels | None, video: Pixels | None, limits: MediaLimits | None = None) -> np.ndarray | None:
    """The uint8 frames `[T, H, W, 3]` a stream starts from, checked (MediaError, one line)."""
    if image is not None and video is not None:
        raise MediaError("give an image or a video to start from, not both")
    source = image if image is not None else video
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (3, 4) or source.shape[-1] != 3:
            raise MediaError(f"frames must be uint8 [H, W, 3] or [T, H, W, 3], got {source.dtype} {source.shape}")
        frames = source[None] if source.ndim == 3 else source
        return frames[:1] if image is not None else frames
    return (load_image(source, limits) if image is not None else load_video(source, limits)).frames


def start_latents(session: Session, image: Pixels | None, video: Pixels | None) -> torch.Tensor | None:
    frames = given_frames(image, video)
    return None if frames is None else session.encode_start(frames)


class Stream:
    """An endless stream; iterate for chunks, `set_prompt` to switch while it runs."""

    def __init__(self, session: Session, prompt: str, seed: int, start: torch.Tensor | None = None, **video_in):
        self.prompt = checked_prompt(prompt)
        self._run: Run = session.run(lambda tick: self.prompt, blocks=None, seed=seed, start=start, **video_in)
        self._frames = self._run.frames()

    @property
    def video_in(self) -> VideoIn | None:
        """The input part of a video-in stream (blocks taken from it, whether it has ended)."""
        return self._run.video_in

    def set_prompt(self, prompt: str) -> None:
        """In-flight blocks take it at their next step (or, with the recache switch, at the next block)."""
        self.prompt = checked_prompt(prompt)

    @property
    def stats(self) -> RunStats:
        return self._run.stats

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            with torch.no_grad():  # the generator's body runs here, between the caller's steps
                block, frames = next(self._frames)
            yield Chunk(block.index, frames, self.prompt)


class StreamingPipeline:
    def __init__(self, session: Session):
        self.session = session

    @classmethod
    def from_preset(
        cls,
        name: str = "demo",
        *,
        checkpoint: str | Path | None = None,
        base: str | Path | None = None,
        text_encoder: str | Path | None = None,
        vae: str | Path | None = None,
        lora: str | Path | None = None,
        special_tokens: str | Path | None = None,
        random_weights: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        topology: Topology | None = None,
        compile: str = "off",
        kv_cache: str = "model",
        attention: str = "auto",
        weights: str = "native",
        offload: str = "none",
        text_encoder_device: str = "model",
        vae_dtype: str = "float32",
    ) -> StreamingPipeline:
        """Load a preset (`python -m launch.presets` lists them) with its weights: the shipped ones
        for the demo, a checkpoint (+ a Wan2.1 diffusers `base` for text encoder and VAE; MAGI-1:
        `special_tokens`, its special_tokens.npz) for real models, or seeded random weights. Under
        torchrun pass the topology of `parallel.runtime.launched`.
        Speed (the same math): `compile` off | default | graphs (CUDA), `kv_cache` model | fp8,
        `attention` auto | math | flash | efficient | cudnn (see `speed_line`). Memory: `weights`
        native | fp8, `offload` none | layers, `text_encoder_device` model | cpu | swap, `vae_dtype`
        float32 | bfloat16."""
        paths = {"checkpoint": checkpoint, "base": base, "text_encoder": text_encoder, "vae": vae, "lora": lora,
                 "special_tokens": special_tokens}  # fmt: skip
        files = WeightPaths(**{k: Path(v) for k, v in paths.items() if v is not None}, random=random_weights)
        torch_device = resolve_device(device)
        speed = SpeedConfig(compile=compile, kv_cache=kv_cache, attention=attention, weights=weights,
                            offload=offload, text_encoder_device=text_encoder_device, vae_dtype=vae_dtype)  # fmt: skip
        dtype_ = resolve_dtype(dtype, torch_device)
        return cls(build_session(get_preset(name), files, torch_device, dtype_, topology, speed=speed))

    @property
    def speed_line(self) -> str:
        """How the forward runs: compiled or eager, the attention kernels, the KV storage."""
        return self.session.executors.speed_line

    @property
    def preset(self) -> Preset:
        return self.session.preset

    def _reconfigure(self, **sections) -> StreamingPipeline:
        self.session = self.session.reconfigured(dataclasses.replace(self.preset, **sections))
        return self

    def enable_cache(self, policy: str = "flowcache", threshold: float | None = None, warmup: int | None = None):
        """Feature caching (cache/): `threshold` None takes the policy's suggested one."""
        threshold = SUGGESTED_THRESHOLDS[policy] if threshold is None else threshold
        return self._reconfigure(cache=CacheConfig(policy=policy, threshold=threshold, warmup=warmup))

    def disable_cache(self) -> StreamingPipeline:
        return self._reconfigure(cache=CacheConfig())

    def set_plan(self, **plan) -> StreamingPipeline:
        """Plan fields: schedule (sequential, pyramid, cascade), offset, context (joint, lagged),
        switch (next-step, recache), attention, compute. Validated as presets are."""
        return self._reconfigure(plan=dataclasses.replace(self.preset.plan, **plan))

    def enable_cascade(self, offset: int = 1, context: str = "joint") -> StreamingPipeline:
        """Block Cascading: on one process the same pyramid plan; under torchrun one block per rank."""
        return self.set_plan(schedule="cascade", offset=offset, context=context)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        blocks: int,
        seed: int = 0,
        image: Pixels | None = None,
        video: Pixels | None = None,
        include_start: bool = False,
        video_in: Iterable | None = None,
        strength: float = 0.6,
    ) -> Video:
        """A finite video of `blocks` new blocks (on a cascade, the frames arrive on the sink rank),
        from noise or from a given `image` / `video` (see the module's docstring). `video_in`:
        uint8 `[H, W, 3]` frames each block starts from, noised to `strength` (video-to-video)."""
        start = start_latents(self.session, image, video)
        v2v = {} if video_in is None else {"video_in": video_in, "strength": strength}
        run = self.session.run(checked_prompt(prompt), blocks=blocks, seed=seed, start=start, **v2v)
        parts = [frames for _, frames in run.frames(include_start=include_start)]
        frames = np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)
        return Video(frames, self.preset.stream.fps, run.stats)

    def stream(
        self,
        prompt: str,
        *,
        seed: int = 0,
        image: Pixels | None = None,
        video: Pixels | None = None,
        video_in: Iterable | None = None,
        strength: float = 0.6,
        wait_s: float | None = None,
    ) -> Stream:
        """An endless stream, from noise or from a given `image` / `video` (never re-emitted).
        With `video_in` (an iterator of uint8 `[H, W, 3]` frames or a FrameFeed) each block starts
        from the input's next frames noised to `strength` in (0, 1], and once the input ends the
        stream goes on from the prompt. A feed waits `wait_s` for a block's frames before holding
        the last picture (None: as long as it takes)."""
        start = start_latents(self.session, image, video)
        v2v = {} if video_in is None else {"video_in": video_in, "strength": strength, "wait_s": wait_s}
        return Stream(self.session, prompt, seed, start, **v2v)
