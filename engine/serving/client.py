"""Watch a stream from a script, switch its prompt, save what arrives.

    python -m engine.client --url ws://127.0.0.1:8000/ws --prompt "a red circle moving left" \\
        --switch-after 5 --prompt2 "a blue square moving up" --seconds 10 --save out.mp4
    python -m engine.client --session ID --seconds 10      # watch (and steer) someone's session
    python -m engine.client --transport webrtc              # the H.264 track, as the page gets it

Frames come as JPEG over the WebSocket (the default), or over WebRTC with `--transport webrtc`
(or `auto`: WebRTC where aiortc is installed and it connects); either way each `Frame` has its
index, timestamp and prompt version (engine/serving/rtc_client.py receives the track).

Python:

    async with StreamClient.connect("ws://127.0.0.1:8000/ws") as client:
        version = await client.set_prompt("a red circle moving left")
        async for frame in client.frames(seconds=5):
            frame.image()   # [H, W, 3] uint8; frame.index, frame.timestamp, frame.prompt_version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from engine.argparsing import OneLineParser
from engine.serving import flags
from engine.serving.protocol import Frame, decode_frame
from engine.serving.rtc_client import TRANSPORTS, RtcReceiver
from engine.serving.video import Mp4Writer

MAX_FRAME_BYTES = 8 * 2**20


class Refused(RuntimeError):
    """The server had no room: `info` has its reason, retry_after_s, queue_position, ticket and
    offer_fps (the frame rate it would give if taken: connect with `accept=True`)."""

    def __init__(self, info: dict):
        super().__init__(info.get("reason", "refused"))
        self.info = info


class StreamClient:
    """One viewer connection: frames in order, replies to control messages, the latest stats.
    `session` is the server's {"type": "session", "id": ...} message (None with a shared stream);
    `ended` its {"type": "ended", "reason": ...} once the session has ended."""

    def __init__(self, connection: ClientConnection, first: str | bytes | None = None):
        self.connection = connection
        self.stats: dict = {}
        self.session: dict | None = None
        self.ended: dict | None = None
        self._first = first  # the message read while checking for a refusal
        self._replies: asyncio.Queue = asyncio.Queue()
        self._frames: asyncio.Queue = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self.rtc: RtcReceiver | None = None
        self.transport = "jpeg"
        """How frames arrive: "webrtc" once its track delivers, else "jpeg"."""
        self._last_index = -1

    @classmethod
    def connect(
        cls, url: str, token: str | None = None, session: str | None = None, accept: bool = False,
        transport: str = "jpeg",
    ) -> _Connecting:  # fmt: skip
        """`session`: join (or come back to) that session instead of opening one. `accept`: take a
        lower frame rate when that is all the server offers. Raises Refused when it has no room.
        `transport`: jpeg (the default: exact frames, nothing to decode), webrtc (fail without it),
        auto (WebRTC where it connects, else JPEG)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        query = {k: v for k, v in (("token", token), ("session", session), ("accept", "1" if accept else None)) if v}
        return _Connecting(url + (f"?{urlencode(query)}" if query else ""), transport)

    async def _read(self) -> None:
        if self._first is not None:
            await self._take(self._first)
        async for message in self.connection:
            await self._take(message)
        await self._frames.put(None)

    async def _take(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self.deliver(decode_frame(message))
            return
        data = json.loads(message)
        if data.get("type") in ("frame", "webrtc"):
            if self.rtc is not None:
                self.rtc.note(data)
        elif data.get("type") == "stats":
            self.stats = data
        elif data.get("type") == "session":
            self.session = data
        elif data.get("type") == "ended":
            self.ended = data
        else:
            await self._replies.put(data)

    async def deliver(self, frame: Frame) -> None:
        """A frame from either path, in order: one the other path already gave is dropped."""
        if frame.index > self._last_index:
            self._last_index = frame.index
            await self._frames.put(frame)

    async def request(self, message: dict | str) -> dict:
        """Send a control message (a dict, or raw text) and return the server's reply."""
        await self.connection.send(message if isinstance(message, str) else json.dumps(message))
        return await asyncio.wait_for(self._replies.get(), timeout=10)

    async def set_prompt(self, text: str) -> int:
        answer = await self.request({"type": "prompt", "text": text})
        if answer.get("type") != "ack":
            raise RuntimeError(f"prompt refused: {answer}")
        return answer["version"]

    async def frames(self, seconds: float | None = None) -> AsyncIterator[Frame]:
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                frame = await asyncio.wait_for(self._frames.get(), timeout=timeout)
            except TimeoutError:
                return
            if frame is None:
                return
            yield frame

    async def close(self) -> None:
        self._reader.cancel()
        if self.rtc is not None:
            await self.rtc.close()
        await self.connection.close()


class _Connecting:
    def __init__(self, url: str, transport: str = "jpeg"):
        self.url, self.transport = url, transport

    async def __aenter__(self) -> StreamClient:
        connection = await connect(self.url, max_size=MAX_FRAME_BYTES)
        try:
            first = await asyncio.wait_for(connection.recv(), timeout=30)
        except (TimeoutError, ConnectionClosed):
            first = None
        greeting = json.loads(first) if isinstance(first, str) else {}
        if greeting.get("type") == "refused":
            await connection.close()
            raise Refused(greeting)
        self.client = StreamClient(connection, first)
        if greeting.get("type") == "session":  # known before the first await of the caller
            self.client.session = greeting
        if self.transport != "jpeg":
            await RtcReceiver.start(self.client, required=self.transport == "webrtc")
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


async def watch(args: argparse.Namespace) -> dict:
    """The CLI's session: set the prompt, maybe switch it, save frames for `seconds`. Measures,
    end to end, the time from connecting to the first frame and from each prompt message to the
    first frame made under it."""
    versions, sent, seen, frames, writer, first_frame_s = {}, {}, {}, 0, None, None
    switched = not args.prompt2
    start = time.monotonic()
    connecting = StreamClient.connect(args.url, args.token, args.session, args.accept_lower_fps, args.transport)
    async with connecting as client:
        if args.prompt:
            sent_at = time.monotonic()
            version = await client.set_prompt(args.prompt)
            versions[version], sent[version] = args.prompt, sent_at
        async for frame in client.frames(seconds=args.seconds):
            now = time.monotonic()
            first_frame_s = first_frame_s if first_frame_s is not None else now - start
            if frame.prompt_version in sent and frame.prompt_version not in seen:
                seen[frame.prompt_version] = now - sent[frame.prompt_version]
            if not switched and now - start >= args.switch_after:
                switched = True
                version = await client.set_prompt(args.prompt2)
                versions[version], sent[version] = args.prompt2, now
            if args.save:
                image = frame.image()
                writer = writer or Mp4Writer(args.save, fps=args.fps, width=image.shape[1], height=image.shape[0])
                writer.write(image[None])
            frames += 1
        stats, session, ended, transport = client.stats, client.session, client.ended, client.transport
    if writer:
        writer.close()
    return {"frames": frames, "seconds": time.monotonic() - start, "versions": versions, "first_frame_s": first_frame_s,
            "switch_s": seen, "server": stats, "session": session and session["id"],
            "ended": ended and ended["reason"], "transport": transport}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m engine.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the stream's WebSocket (default: %(default)s)")
    parser.add_argument("--token", help="the server's --token (default: none)")
    parser.add_argument("--session", help="join this session (its id from a share link) (default: a new one)")
    parser.add_argument("--prompt", type=flags.prompt,
                        help="switch to this prompt on connecting (default: keep the stream's)")  # fmt: skip
    parser.add_argument("--prompt2", type=flags.prompt,
                        help="switch to this prompt once, --switch-after seconds in (default: no switch)")  # fmt: skip
    parser.add_argument(
        "--switch-after",
        type=float,
        default=5.0,
        help="seconds after connecting to send --prompt2 (default: %(default)s)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to watch (default: %(default)s)")
    parser.add_argument(
        "--accept-lower-fps",
        action="store_true",
        help="take the lower frame rate a full server offers (default: refuse it and exit)",
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="jpeg",
                        help="jpeg: frames as JPEG over the WebSocket; webrtc: the H.264 track (aiortc), failing "
                        "without it; auto: WebRTC where it connects, else JPEG (default: %(default)s)")  # fmt: skip
    parser.add_argument("--save", type=Path, help="write the frames received to this MP4 (default: save nothing)")
    parser.add_argument("--fps", type=int, default=16, help="frame rate of the saved MP4 (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(watch(args))
    except Refused as refused:
        retry, offer = refused.info.get("retry_after_s"), refused.info.get("offer_fps")
        fix = f"; --accept-lower-fps takes {offer:g} fps now" if offer else ""
        print(f"error: {refused}" + (f"; try again in {retry:g} s" if retry else "") + fix, file=sys.stderr)
        return 1
    except (OSError, RuntimeError, WebSocketException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result["session"]:
        print(f"session {result['session']} (others join it with --session {result['session']})")
    print(f"received {result['frames']} frames in {result['seconds']:.1f} s over {result['transport']}; "
          f"prompts {result['versions']}")  # fmt: skip
    if result["first_frame_s"] is not None:
        print(f"first frame {result['first_frame_s']:.2f} s after connecting")
    for version, seconds in result["switch_s"].items():
        print(f"prompt version {version} on screen {seconds:.2f} s after it was sent")
    if args.save:
        print(f"wrote {args.save}")
    if result["ended"]:
        print(f"the session ended: {result['ended']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
