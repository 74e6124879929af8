"""Transport: JPEG over the WebSocket against WebRTC, in bytes, quality, encode time and latency.

    python -m launch.bench transport --clip original.mp4      # 64x64 demo scenes and 480x832 footage
    python -m launch.bench transport --clip original.mp4 --no-browser   # the encoder rows only

For each size and transport, the same frames go through the server's own encoders:
* JPEG: `encode_frame` (quality 85) as the WebSocket sends it (+ the frame's WebSocket header);
* WebRTC: the server's `FrameEncoder` (libx264 H.264 at the server's settings, other quality
  levels and VP8 for comparison) and aiortc's RTP packetizer, + 12 bytes of RTP header, 12 of its header
  extensions and 10 of SRTP's tag per packet, + the `frame` message each frame's info takes on
  the WebSocket. PSNR is of the decoded frames against the frames sent, over all frames.
Encode time: process CPU seconds per frame (every thread of the encoder) and wall ms.

With Chromium (the browser test's setup), each transport is also watched for real: a server in
this process publishes the clip at its fps, one frame at a time, to the viewer page; the page
reports each frame's presentation time (`requestVideoFrameCallback` for the track, the canvas
draw for JPEG) and the bytes it received. Glass-to-glass = presentation time - the time the
frame was handed to the server, on one clock (loopback). The 480x832 clip is any video file
(`--clip`, resized to 480x832 if it is not); the docs say which one was measured.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from engine.config import ConfigError

COLUMNS = ["size", "transport", "quality", "bytes_per_s", "vs_jpeg", "psnr_db", "encode_cpu_ms", "encode_wall_ms",
           "browser_bytes_per_s", "g2g_p50_ms", "g2g_p90_ms", "frames_presented"]  # fmt: skip
RTP_OVERHEAD = 12 + 12 + 10  # header, header extensions (abs-send-time, mid), SRTP auth tag
WS_HEADER = 4  # a server-to-client WebSocket frame of 126..65535 bytes (8 above)
FRAME_MESSAGE = 110  # {"type": "frame", "index": ..., "version": ..., "timestamp": ..., "rtp": ...}
LEVELS = [("H264", "server", None), ("H264", "crf 23", {"crf": "23"}), ("VP8", "server", None)]
"""(codec, label, options): None is the server's own setting."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip", type=Path, help="real footage for the 480x832 rows (default: those rows are skipped)")
    parser.add_argument("--frames", type=int, default=80, help="frames per size (a clip shorter than this loops)")
    parser.add_argument("--fps", type=int, default=16, help="frame rate of the stream")
    parser.add_argument("--watch-s", type=float, default=12.0, help="seconds the browser watches each transport")
    parser.add_argument("--no-browser", dest="browser", action="store_false", help="skip the Chromium rows")


def run(args: argparse.Namespace) -> tuple[list[dict], list[str], dict]:
    if args.clip is not None and not args.clip.is_file():
        raise ConfigError(f"--clip {args.clip}: no such file")
    load_before = os.getloadavg()
    sizes = {"64x64": demo_frames(args.frames)}
    if args.clip is not None:
        sizes["480x832"] = clip_frames(args.clip, args.frames, 480, 832)
    rows = []
    for size, frames in sizes.items():
        size_rows = encoder_rows(size, frames, args.fps)
        if args.browser:
            watch_rows(size_rows, frames, args.fps, args.watch_s)
        rows += size_rows
    settings = dict(threads=os.environ.get("OMP_NUM_THREADS", "default"), cores=os.cpu_count(), fps=args.fps,
                    frames=args.frames, clip=str(args.clip) if args.clip else None, load_average_before=load_before,
                    load_average_after=os.getloadavg())  # fmt: skip
    print(f"load average {load_before[0]:.2f} before, {settings['load_average_after'][0]:.2f} after, "
          f"on {settings['cores']} cores")  # fmt: skip
    return rows, COLUMNS, settings


def demo_frames(count: int) -> np.ndarray:
    """`[N, 64, 64, 3]`: the demo's scenes (what its model draws), a few prompts in turn."""
    from engine.demo.scenes import make_clip

    rng = np.random.default_rng(0)
    return np.concatenate([make_clip(rng, frames=24, centred=True).frames for _ in range(-(-count // 24))])[:count]


def clip_frames(path: Path, count: int, height: int, width: int) -> np.ndarray:
    """`[N, height, width, 3]` from a video file, looped to `count` frames, resized if need be."""
    from PIL import Image

    from engine.serving.video import read_frames

    frames = read_frames(path)
    if frames.shape[1:3] != (height, width):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])
    return np.concatenate([frames] * (-(-count // len(frames))))[:count]


# -- through the encoders ----------------------------------------------------------------------------


def encoder_rows(size: str, frames: np.ndarray, fps: int) -> list[dict]:
    jpeg = _jpeg_row(frames, fps)
    rows = [dict(size=size, **jpeg)]
    for codec, level, options in LEVELS:
        rows.append(dict(size=size, **_rtc_row(frames, fps, codec, level, options)))
    for row in rows:
        row["vs_jpeg"] = round(row["bytes_per_s"] / jpeg["bytes_per_s"], 3)
    return rows


def _jpeg_row(frames: np.ndarray, fps: int) -> dict:
    from PIL import Image

    from engine.serving.protocol import JPEG_QUALITY, encode_frame

    sizes, decoded, cpu, wall = [], [], 0.0, 0.0
    for index, frame in enumerate(frames):
        start, start_wall = time.process_time(), time.perf_counter()
        message = encode_frame(index, index / fps, 1, frame)
        cpu, wall = cpu + time.process_time() - start, wall + time.perf_counter() - start_wall
        sizes.append(len(message) + WS_HEADER)
        decoded.append(np.asarray(Image.open(io.BytesIO(message[20:])).convert("RGB")))
    return _row("jpeg", f"quality {JPEG_QUALITY}", sizes, frames, np.stack(decoded), cpu, wall, fps)


def _rtc_row(frames: np.ndarray, fps: int, codec: str, level: str, options: dict | None) -> dict:
    import av
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.vpx import Vp8Encoder

    from engine.serving.webrtc import SOFTWARE_QUALITY, VP8_QUALITY, FrameEncoder

    h264 = codec == "H264"
    encoder = FrameEncoder("libx264" if h264 else "libvpx", fps, options)
    packetizer = H264Encoder() if h264 else Vp8Encoder()
    decoder = av.CodecContext.create("h264" if h264 else "libvpx", "r")
    sizes, decoded, cpu, wall = [], [], 0.0, 0.0
    for index, frame in enumerate(frames):
        start, start_wall = time.process_time(), time.perf_counter()
        packets = encoder.encode(frame, index, keyframe=index == 0)
        cpu, wall = cpu + time.process_time() - start, wall + time.perf_counter() - start_wall
        payloads = [p for packet in packets for p in packetizer.pack(packet)[0]]
        sizes.append(sum(len(p) + RTP_OVERHEAD for p in payloads) + FRAME_MESSAGE)
        for packet in packets:
            decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(av.Packet(bytes(packet)))]
    server = SOFTWARE_QUALITY if h264 else VP8_QUALITY
    quality = "server: " + ", ".join(f"{k} {v}" for k, v in server.items()) if options is None else level
    return _row(f"webrtc ({codec})", quality, sizes, frames, np.stack(decoded), cpu, wall, fps)


def _row(transport, quality, sizes, frames, decoded, cpu, wall, fps) -> dict:
    from engine.eval.metrics import psnr

    per_frame = 1e3 / len(frames)
    return dict(transport=transport, quality=quality, bytes_per_s=round(float(np.mean(sizes)) * fps),
                psnr_db=round(psnr(decoded, frames[: len(decoded)]), 2), encode_cpu_ms=round(cpu * per_frame, 2),
                encode_wall_ms=round(wall * per_frame, 2))  # fmt: skip


# -- watched in Chromium -----------------------------------------------------------------------------


def watch_rows(rows: list[dict], frames: np.ndarray, fps: int, seconds: float) -> None:
    """Fill the browser columns of the JPEG row and the server-setting WebRTC row."""
    for row, transport in ((rows[0], "jpeg"), (rows[1], "webrtc")):
        measured = watch(frames, fps, seconds, transport)
        row.update(measured)


def watch(frames: np.ndarray, fps: int, seconds: float, transport: str) -> dict:
    from playwright.sync_api import sync_playwright

    from engine.serving.live import Controls
    from engine.serving.server import StreamServer

    server = StreamServer(Controls("footage"), host="127.0.0.1", port=0, token=None, fps=fps).start()
    made: dict[int, float] = {}
    stop = threading.Event()
    publisher = threading.Thread(target=_publish, args=(server, frames, fps, made, stop), daemon=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    query = "?measure" + ("&transport=jpeg" if transport == "jpeg" else "")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.url + query)
            publisher.start()
            page.wait_for_timeout(3000)  # settle: the track's negotiation, the first keyframe
            start_bytes, start = _received(page, transport), time.monotonic()
            page.wait_for_timeout(seconds * 1000)
            received = (_received(page, transport) - start_bytes) / (time.monotonic() - start)
            presented = {int(k): v for k, v in page.evaluate("window.arcade.presented").items()}
            shown_over = page.text_content("#s-transport")
            browser.close()
    finally:
        stop.set()
        server.stop()
    if transport == "webrtc" and not shown_over.startswith("WebRTC"):
        raise RuntimeError(f"the page did not play WebRTC: {shown_over}")
    latencies = sorted(presented[i] - made[i] * 1000 for i in presented if i in made)
    if not latencies:
        raise RuntimeError(f"no frame was presented over {transport}")
    p90 = latencies[int(0.9 * (len(latencies) - 1))]
    return dict(browser_bytes_per_s=round(received), g2g_p50_ms=round(statistics.median(latencies), 1),
                g2g_p90_ms=round(p90, 1), frames_presented=len(latencies))  # fmt: skip


def _publish(server, frames: np.ndarray, fps: int, made: dict, stop: threading.Event) -> None:
    """The clip, looped, one frame every 1/fps s, as a paced stream hands them out."""
    index, next_at = 0, time.monotonic()
    while not stop.is_set():
        made[index] = time.time()
        server.hub.publish(frames[index % len(frames)][None], index, 1, index / fps)
        index += 1
        next_at += 1 / fps
        time.sleep(max(next_at - time.monotonic(), 0))


def _received(page, transport: str) -> float:
    """Bytes the page has received: the RTP payloads of its track, or the WebSocket's frames."""
    if transport == "jpeg":
        return page.evaluate("window.arcade.bytes")
    script = """async () => { let total = 0; (await pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "video") total += s.bytesReceived + s.headerBytesReceived; });
        return total; }"""
    return page.evaluate(script)
