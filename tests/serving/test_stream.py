"""The streaming service end to end: a real server process, real WebSocket clients, a real browser.

    pytest tests/serving/test_stream.py

The browser test drives Debian's Chromium (`apt-get install chromium`) with Playwright.
"""

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from websockets.sync.client import connect

from engine.client import StreamClient
from engine.demo.scenes import parse_prompt
from engine.eval.adherence import adherence, read_video, torus_steps
from engine.serving.client import build_parser, watch
from engine.serving.protocol import MAX_MESSAGE_BYTES, MAX_PROMPT_BYTES, ProtocolError, decode_frame, parse_control
from engine.serving.server import VIEWER_QUEUE, needs_token

CHROMIUM = "/usr/bin/chromium"
FIRST, SECOND = "a red circle moving left", "a blue square moving up"


@contextmanager
def server(*args: str, timeout: float = 60):
    """`python -m engine.stream` on a free port; yields (http base, process); stops it with SIGINT."""
    command = [sys.executable, "-m", "launch.stream", "--port", "0", "--prompt", FIRST, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and "serving" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stdout.read()}")
        base = re.search(r"http://[\d.]+:\d+", line).group(0)
        yield base, process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


@pytest.fixture(scope="module")
def demo_server():
    with server("--preset", "demo", "--no-pace", "--shared-stream") as (base, process):
        yield base, process


def ws_url(base: str) -> str:
    return base.replace("http", "ws") + "/ws"


# -- protocol, no server -------------------------------------------------------------------------


def test_control_messages_are_validated():
    assert parse_control('{"type": "prompt", "text": "  a  red circle "}').text == "a red circle"
    assert parse_control('{"type": "pause"}').type == "pause"
    for bad, reason in [
        (b'{"type": "pause"}', "not binary"),
        (b"\xff\xfe", "not binary"),
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "shutdown"}', "unknown message type"),
        ('{"type": "prompt"}', "non-empty"),
        (json.dumps({"type": "prompt", "text": "x" * (MAX_PROMPT_BYTES + 1)}), "longer than"),
        (json.dumps({"type": "prompt", "text": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, ensure_ascii=False), "bytes"),
        ("é" * (MAX_MESSAGE_BYTES // 2 + 1), "longer than"),
        ('{"type": "prompt", "text": "a\\u0000b"}', "control characters"),
        ("x" * (MAX_MESSAGE_BYTES + 1), "longer than"),
        ("[" * 100000, "longer than"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            parse_control(bad)


def test_token_needed_off_loopback():
    assert not needs_token("127.0.0.1") and not needs_token("localhost") and not needs_token("::1")
    assert needs_token("0.0.0.0") and needs_token("") and needs_token("example.org") and needs_token("10.1.2.3")
    result = subprocess.run(
        [sys.executable, "-m", "launch.stream", "--host", "0.0.0.0"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "--token" in result.stderr


def test_every_client_flag_says_what_it_does_and_its_default():
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings


def test_allowed_origins_on_the_command_line():
    from launch.stream import parse_args

    args = parse_args(["--allow-origin", "https://Stream.example", "--allow-origin", "*"])
    assert args.allow_origin == ["https://stream.example:443", "*"]
    for bad in ["stream.example", "https://stream.example/page", "ftp://stream.example", "http://:80"]:
        with pytest.raises(SystemExit):
            parse_args(["--allow-origin", bad])


def test_stream_start_errors_are_one_line_before_any_model_loads():
    """A taken port (the server listens before weights load) and a port out of range."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for port in [str(taken.getsockname()[1]), "70000"]:
            command = [sys.executable, "-m", "launch.stream", "--preset", "demo", "--port", port]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
            assert "port" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


# -- a running server ------------------------------------------------------------------------------


async def _session(url: str, seconds: float, switch_after: float):
    frames, acks = [], {}
    async with StreamClient.connect(url) as client:
        start = time.monotonic()
        async for frame in client.frames(seconds=seconds):
            frames.append(frame)
            if SECOND not in acks.values() and time.monotonic() - start > switch_after:
                acks[await client.set_prompt(SECOND)] = SECOND
    return frames, acks


def test_frames_arrive_in_order_and_follow_a_switch(demo_server):
    base, _ = demo_server
    frames, acks = asyncio.run(_session(ws_url(base), seconds=14, switch_after=4))
    indices = [f.index for f in frames]
    assert len(frames) > 48 and indices == sorted(indices) and len(set(indices)) == len(indices)
    assert all(b.timestamp >= a.timestamp for a, b in zip(frames, frames[1:]))
    (version,) = acks
    after = [f for f in frames if f.prompt_version == version]
    before = [f for f in frames if f.prompt_version < version]
    assert len(after) >= 24 and before, "frames before and after the switch"
    assert min(f.index for f in after) > max(f.index for f in before), "no going back to the old prompt"
    # By content: the first prompt's color and motion over the 4 blocks before the switch; over
    # blocks 3-6 after it, the new prompt's. (Color and motion follow within 2 blocks for every
    # switch tick 1-8 of this pair; shape is not checked: the demo model's shape follows a switch
    # too seldom.) Equal 4-block windows: over all ~200 frames after it, a shape that lingers at
    # an edge can jitter back and forth once, which the motion reader takes for a bounce.
    block = 3  # pixel frames per block of the demo preset
    for frames_seen, prompt in ((before[-4 * block :], FIRST), (after[2 * block : 6 * block], SECOND)):
        video = np.stack([f.image() for f in frames_seen])
        scores = adherence(video, parse_prompt(prompt))
        assert scores["color"] and scores["motion"], (prompt, scores, read_video(video))


def test_bad_messages_get_errors_and_change_nothing(demo_server):
    base, _ = demo_server
    with connect(ws_url(base), max_size=2**24) as ws:
        for message in ["hello", b"\xc3\x28", '{"type": 7}', '{"type": "reboot"}', "[]" * 3000]:
            ws.send(message)
            answer = _next_control(ws)
            assert answer["type"] == "error", answer
        ws.send('{"type": "stats"}')
        assert _next_control(ws, stats=True)["prompt"] in (FIRST, SECOND)


def test_the_client_without_a_first_prompt_switches_once(demo_server):
    base, _ = demo_server
    args = build_parser().parse_args(["--url", ws_url(base), "--prompt2", SECOND, "--switch-after", "0.5",
                                      "--seconds", "3"])  # fmt: skip
    result = asyncio.run(watch(args))
    assert list(result["versions"].values()) == [SECOND], result["versions"]


def _next_control(ws, stats: bool = False) -> dict:
    """The reply to the last control message (pushed stats are skipped unless stats were asked for)."""
    while True:
        message = ws.recv(timeout=10)
        if isinstance(message, str):
            data = json.loads(message)
            if data["type"] != "stats" or stats:
                return data


def test_token_is_enforced():
    with server("--preset", "tiny-wan", "--token", "sesame", "--shared-stream") as (base, _):
        with pytest.raises(Exception, match="401"):
            connect(ws_url(base)).close()
        with connect(ws_url(base) + "?token=sesame") as ws:
            assert isinstance(ws.recv(timeout=20), (bytes, str))
        assert b"401" not in _http_get(base + "/?token=sesame")[:20]


def _http_get(url: str) -> bytes:
    host, port = re.search(r"//([\d.]+):(\d+)", url).groups()
    path = url.split(port, 1)[1] or "/"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return sock.recv(65536)


# -- a viewer that never reads ----------------------------------------------------------------------


def _stalled_viewer(base: str) -> socket.socket:
    """A raw WebSocket handshake, then never a single read."""
    host, port = re.search(r"//([\d.]+):(\d+)", base).groups()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window from the start
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(
        (f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    )  # fmt: skip
    return sock


async def _watch_while_stalled(url: str) -> tuple[list[int], dict, dict]:
    """Watch until the stalled viewer has lost a queue's worth of frames and this one has received
    two (the server's own counts). Returns this viewer's frame indices and the server's stats at
    the first and last frame."""
    indices, first, deadline = [], {}, time.monotonic() + 150
    async with StreamClient.connect(url) as client:
        async for frame in client.frames(seconds=150):
            indices.append(frame.index)
            stats = client.stats
            first = first or stats
            stalled_dropped = stats.get("viewers_dropped", 0) - stats.get("you_dropped", 0)
            if stalled_dropped >= VIEWER_QUEUE and len(indices) >= 2 * VIEWER_QUEUE:
                return indices, first, stats
            assert time.monotonic() < deadline, f"the stalled viewer never lost {VIEWER_QUEUE} frames: {stats}"
    raise AssertionError(f"the stream ended after {len(indices)} frames")


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


def test_a_stalled_viewer_slows_no_one(demo_server):
    """While a viewer that never reads loses frames, a healthy one gets every frame made: each
    frame index in its span either arrived or is in the server's count of frames dropped for it
    (or never encoded). Counts in one run, not rates, so a busy machine changes nothing."""
    base, process = demo_server
    rss_before = _rss_kb(process.pid)
    stalled = _stalled_viewer(base)
    try:
        indices, first, last = asyncio.run(_watch_while_stalled(ws_url(base)))
        rss_after = _rss_kb(process.pid)
    finally:
        stalled.close()
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    missing = (indices[-1] - indices[0] + 1) - len(indices)
    own_losses = last["you_dropped"] + last["encoder_dropped"] - first["encoder_dropped"]
    assert missing <= own_losses, f"{missing} frames neither arrived nor were counted as dropped"
    stalled_dropped = last["viewers_dropped"] - last["you_dropped"]
    assert last["you_dropped"] < stalled_dropped, f"the healthy viewer lost {last['you_dropped']} frames"
    assert rss_after - rss_before < 200_000, f"server memory grew by {(rss_after - rss_before) // 1024} MiB"


# -- fuzzing ---------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
MESSAGES = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=600),
    JSON_VALUES.map(json.dumps),
    st.dictionaries(st.sampled_from(["type", "text", "x"]), JSON_VALUES, max_size=3).map(json.dumps),
    st.builds(lambda t: json.dumps({"type": "prompt", "text": t}), st.text(max_size=700)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(MESSAGES, min_size=1, max_size=5))
def test_fuzzed_control_messages(demo_server, messages):
    base, _ = demo_server
    with connect(ws_url(base), max_size=2**24) as ws:
        for message in messages:
            try:
                valid = parse_control(message)
            except ProtocolError:
                valid = None
            ws.send(message)
            answer = _next_control(ws, stats=valid is not None and valid.type == "stats")
            assert answer["type"] != "error" if valid else answer["type"] == "error", (message, answer)
        frame = next(m for m in iter(lambda: ws.recv(timeout=10), None) if isinstance(m, bytes))
        assert decode_frame(frame).index >= 0, "the stream keeps streaming"


# -- a real browser ---------------------------------------------------------------------------------


def test_the_viewer_page_in_chromium(demo_server):
    assert os.path.exists(CHROMIUM), "the browser test needs Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    base, _ = demo_server
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            failed = []
            page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
            page.goto(base + "/?transport=jpeg")  # the fallback; WebRTC: test_the_viewer_page_plays_webrtc_in_chromium
            page.wait_for_function("document.getElementById('s-frames').textContent > 10", timeout=30000)
            first = page.evaluate("document.getElementById('video').toDataURL()")
            page.wait_for_timeout(1500)
            assert page.evaluate("document.getElementById('video').toDataURL()") != first, "the canvas must change"
            _check_layout(page)
            assert page.text_content("#s-ttff").endswith(" ms"), "this viewer's own time to first frame"
            _check_prompts(page)
            _check_page_drops(page)
            assert not failed, f"requests that failed: {failed}"
        finally:
            browser.close()


GRAB = """async (count) => {   // the next `count` frames the video element presents, as RGBA
  const video = document.getElementById('rtc'), canvas = document.createElement('canvas');
  const context = canvas.getContext('2d'), out = [];
  while (out.length < count) {
    const meta = await new Promise((done) => video.requestVideoFrameCallback((now, meta) => done(meta)));
    canvas.width = meta.width; canvas.height = meta.height;
    context.drawImage(video, 0, 0);
    out.push(Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data));
  }
  return [canvas.height, canvas.width, out];
}"""


def test_webrtc_both_ways_in_chromium(tmp_path):
    """Sessions on the demo model. The page negotiates WebRTC on its own and at least 30 frames
    are presented from the track (requestVideoFrameCallback); the frame on screen names its prompt
    version, and a switch changes the picture to the new prompt's colour. Then Chromium's fake
    camera, fed a red circle moving right, goes up the same connection under "a blue circle": the
    picture is a blue object moving right (the demo's readers)."""
    assert os.path.exists(CHROMIUM), "the browser test needs Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    from engine.demo import scenes

    red = scenes.parse_prompt("a red circle moving right")
    # 64 frames at 2 px a frame round the 64 px torus twice: the fake camera's loop has no jump
    clip = scenes.make_clip(np.random.default_rng(1), frames=64, description=red).frames
    camera = _write_y4m(tmp_path / "camera.y4m", clip)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={camera}"]  # fmt: skip
    with server("--preset", "demo") as (base, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(base + "/")
            page.wait_for_function("window.arcade.rtcFrames >= 30", timeout=60000)
            assert page.text_content("#s-transport").startswith("WebRTC ("), page.text_content("#s-transport")
            assert page.is_hidden("#video") and page.is_visible("#rtc"), "the track plays in place of the canvas"
            assert read_video(_grab(page, 9)).color == "red", "the session's first prompt: " + FIRST
            assert _switch_and_look(page, "a blue circle").color == "blue"
            page.click("#camera")
            page.wait_for_function("document.getElementById('status').textContent.includes('camera is in')",
                                   timeout=30000)  # fmt: skip
            page.wait_for_function("document.getElementById('s-transport').textContent.includes('camera in')",
                                   timeout=30000)  # the new connection's track plays  # fmt: skip
            reading = read_video(_grab(page, 48)[18:])  # 30 frames from the seventh block on: in-flight blocks done
            colors = Counter(frame.color for frame in reading.frames)
            assert reading.color == "blue", (reading.color, colors)
            step = _mean_step([frame.center for frame in reading.frames], size=64)
            assert step[0] > 0.5 and abs(step[1]) < 0.5, (step, reading.motion)  # rightward, as the camera moves
        finally:
            browser.close()


def _mean_step(centers: list, size: int, glitch: float = 8.0) -> np.ndarray:
    """The mean (dx, dy) from one frame's object to the next, torus-aware, leaving out jumps over
    `glitch` pixels (a frame whose object reads in two places). On a loaded machine frames repeat
    or skip (the camera queue drops its oldest frames): that changes the mean's size, not its
    direction, where it can make the motion reader see a bounce."""
    steps = torus_steps([c for c in centers if c is not None], size)
    steps = steps[np.abs(steps).max(axis=1) <= glitch]
    return steps.mean(axis=0) if len(steps) else np.zeros(2)


def _write_y4m(path, frames: np.ndarray):
    """A Y4M file (what Chromium's fake camera reads) of `[N, H, W, 3]` uint8 frames."""
    from engine.serving.video import rgb_to_yuv420p

    height, width = frames.shape[1:3]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F16:1 Ip A1:1 C420\n".encode())
        for frame in frames:
            out.write(b"FRAME\n" + rgb_to_yuv420p(frame).tobytes())
    return path


def _grab(page, count: int) -> np.ndarray:
    """The next `count` frames the page presents from its track, `[count, H, W, 3]` uint8."""
    height, width, frames = page.evaluate(GRAB, count)
    return np.asarray(frames, np.uint8).reshape(len(frames), height, width, 4)[..., :3]


def _switch_and_look(page, prompt: str):
    """Switch; once the frame on screen says the new version, read the picture from the third
    block on (the demo's reader)."""
    page.evaluate("setStatus('')")
    page.fill("#prompt", prompt)
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('status').textContent.includes('accepted')", timeout=20000)
    version = re.search(r"prompt (\d+) accepted", page.text_content("#status")).group(1)
    page.wait_for_function(f"document.getElementById('s-onscreen').textContent === '{version}'", timeout=30000)
    return read_video(_grab(page, 12)[6:])


def _check_layout(page) -> None:
    """At 1100x760 the video, the prompt box and every stats row are on screen without scrolling."""
    shown = "#rtc" if page.is_visible("#rtc") else "#video"  # the WebRTC track, or the JPEG canvas
    for selector in [shown, "#prompt", "#stats"]:
        box = page.locator(selector).bounding_box()
        assert box["x"] + box["width"] <= 1100 and box["y"] + box["height"] <= 760, (selector, box)


def _check_prompts(page) -> None:
    """A switch shows as the current prompt (and the box's placeholder); ignored words are named."""
    page.fill("#prompt", "a green triangle moving right")
    page.click("button[type=submit]")
    current = "document.getElementById('s-prompt').textContent === 'a green triangle moving right'"
    page.wait_for_function(current, timeout=20000)
    assert "accepted" in page.text_content("#status")
    placeholder = "document.getElementById('prompt').placeholder === 'a green triangle moving right'"
    page.wait_for_function(placeholder, timeout=10000)
    page.fill("#prompt", "a purple dragon flying")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('status').textContent.includes('ignores')", timeout=20000)
    assert all(word in page.text_content("#status") for word in ["purple", "dragon", "flying"])


def _check_page_drops(page) -> None:
    """A page that stops drawing (a busy or hidden tab; here its draw loop is stopped) keeps at
    most two seconds of frames and counts the ones it throws away, however fast frames come."""
    page.evaluate("draw = () => {}")
    dropped = "document.getElementById('s-dropped').textContent"
    deadline = time.monotonic() + 60
    while "page" not in page.evaluate(dropped):
        assert time.monotonic() < deadline, page.evaluate("[received, shown, queue.length, pageDropped, fps]")
        page.wait_for_timeout(200)


# -- sessions in a real browser ----------------------------------------------------------------------


def test_viewer_pages_get_their_own_sessions_and_share_links_join_them():
    """Default mode: each page its own session, its id and share link shown; a page opened with
    the link joins that session (same id, same prompt after a switch); another page does not: it
    gets a session of its own, or, when admission (measured throughput: a busy machine) has no
    room, the refusal with its retry. tiny-wan: the test is about sessions, not pictures."""
    assert os.path.exists(CHROMIUM), "the browser test needs Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    shown = "document.getElementById('s-share').textContent.length > 5"
    with server("--preset", "tiny-wan") as (base, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            first = browser.new_page(viewport={"width": 1100, "height": 760})
            first.goto(base + "/")
            first.wait_for_function(shown, timeout=30000)
            first.wait_for_function("document.getElementById('s-frames').textContent > 6", timeout=60000)
            _check_layout(first)
            first.wait_for_function("document.getElementById('s-slack').textContent.endsWith(' s')",
                                    timeout=10000)  # per-session stats are shown  # fmt: skip
            _check_start_from_file(first)
            link, own = first.get_attribute("#s-share", "href"), first.text_content("#s-share")
            assert link.endswith(f"/?session={own}") and first.url.endswith(f"?session={own}"), (link, first.url)
            joined = browser.new_page()
            joined.goto(link)
            joined.wait_for_function(f"document.getElementById('s-share').textContent === '{own}'", timeout=30000)
            joined.wait_for_function("document.getElementById('s-viewers').textContent === '2'", timeout=30000)
            other = browser.new_page()
            other.goto(base + "/")
            other.wait_for_function(f"{shown} || document.getElementById('status').textContent.includes('again')",
                                    timeout=30000)  # fmt: skip
            first.fill("#prompt", "a green triangle moving right")
            first.click("button[type=submit]")
            switched = "document.getElementById('s-prompt').textContent === 'a green triangle moving right'"
            joined.wait_for_function(switched, timeout=30000)
            if other.text_content("#s-share").strip("–"):
                assert other.text_content("#s-share") != own, "another page, another session"
                assert other.text_content("#s-prompt") != "a green triangle moving right"
            else:
                assert "server full" in other.text_content("#status"), other.text_content("#status")
        finally:
            browser.close()


def _check_start_from_file(page) -> None:
    """The page's file input restarts its session from an image; a file that is no image or video
    gets the server's one-line error in the status line."""
    png = io.BytesIO()
    Image.fromarray(np.full((48, 80, 3), 120, np.uint8)).save(png, format="PNG")
    status = "document.getElementById('status').textContent"
    page.set_input_files("#start-file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"hello"}])
    page.wait_for_function(f"{status}.includes('not an image or video')", timeout=20000)
    page.set_input_files("#start-file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": png.getvalue()}])
    page.wait_for_function(f"{status}.includes('started from your file')", timeout=30000)
