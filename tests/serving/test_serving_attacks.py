"""The service attacked, with no model behind it: a StreamServer in this process on a loopback
port, fed synthetic frames, and raw sockets or WebSocket clients doing what an adversary would.

    pytest tests/serving/test_serving_attacks.py
"""

import json
import pickle
import re
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
from websockets.sync.client import connect

from engine.serving.controls import Controls
from engine.serving.protocol import decode_frame
from engine.serving.server import StreamServer

PROMPT = "a red circle moving left"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@contextmanager
def serving(token: str | None = None, **options):
    """A server on 127.0.0.1 fed two 16x16 frames every 30 ms; yields (server, controls)."""
    controls = Controls(PROMPT)
    server = StreamServer(controls, host="127.0.0.1", port=0, token=token, **options).start()
    stop = threading.Event()

    def feed():
        index, frames = 0, np.zeros((2, 16, 16, 3), dtype=np.uint8)
        while not stop.wait(0.03):
            server.hub.publish(frames, index, controls.snapshot().version, index / 30)
            index += len(frames)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield server, controls
    finally:
        stop.set()
        feeder.join(timeout=5)
        server.stop()


@pytest.fixture(scope="module")
def open_server():
    with serving(ignored_words=lambda text: [w for w in text.split() if w in ("purple", "dragon")]) as running:
        yield running


def _port(server: StreamServer) -> int:
    return server.address[1]


def _raw(port: int, request: str, read: int = 65536) -> bytes:
    """One raw HTTP exchange: everything the server sends until it closes (or `read` bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode("latin-1"))
        data = b""
        while len(data) < read and (chunk := sock.recv(65536)):
            data += chunk
        return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _handshake(port: int, path: str = "/ws", host: str | None = None, origin: str | None = None) -> int:
    """The status of a raw WebSocket handshake (101: accepted)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {_default(host, port)}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]  # fmt: skip
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return _status(_raw(port, "\r\n".join(lines) + "\r\n\r\n", read=12))


def _silent_viewer(port: int) -> socket.socket:
    """A completed WebSocket handshake, then never a read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]  # fmt: skip
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _get(port: int, path: str, method: str = "GET", host: str | None = None) -> bytes:
    return _raw(port, f"{method} {path} HTTP/1.1\r\nHost: {_default(host, port)}\r\nContent-Length: 0\r\n\r\n")


def _default(host: str | None, port: int) -> str:
    return f"127.0.0.1:{port}" if host is None else host


def _reply(ws) -> dict:
    """The next control reply (pushed stats skipped)."""
    while True:
        message = ws.recv(timeout=10)
        if isinstance(message, str) and (data := json.loads(message))["type"] != "stats":
            return data


# -- cross-site WebSocket hijacking and DNS rebinding ---------------------------------------------


def test_websockets_from_other_sites_are_refused(open_server):
    server, _ = open_server
    port = _port(server)
    assert _handshake(port) == 101, "a program (no Origin) may connect"
    assert _handshake(port, origin=f"http://127.0.0.1:{port}") == 101, "the server's own page may connect"
    assert _handshake(port, host=f"localhost:{port}", origin=f"http://localhost:{port}") == 101
    for origin in ["https://evil.example", f"http://evil.example:{port}", "null", f"http://127.0.0.1:{port + 1}",
                   f"http://localhost:{port}", "file://", "chrome-extension://abc"]:  # fmt: skip
        assert _handshake(port, origin=origin) == 403, origin


def test_requests_by_a_rebound_name_are_refused(open_server):
    """A page on evil.example re-pointed at 127.0.0.1 names evil.example in Host: no page, no socket."""
    server, _ = open_server
    port = _port(server)
    for host in [f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", ""]:
        assert _status(_get(port, "/", host=host)) == 403, host
        assert _handshake(port, host=host, origin=f"http://{host}") == 403, host
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"view.localhost:{port}"]:
        assert _status(_get(port, "/", host=host)) == 200, host


def test_allowed_origins_may_connect():
    with serving(allow_origins=("https://Stream.example",)) as (server, _):
        port = _port(server)
        assert _handshake(port, host="stream.example", origin="https://stream.example") == 101
        assert _handshake(port, host="stream.example", origin="https://other.example") == 403
    with serving(allow_origins=("*",)) as (server, _):
        assert _handshake(_port(server), origin="https://anyone.example") == 101


# -- the token --------------------------------------------------------------------------------------


def test_token_bypass_attempts_fail():
    with serving(token="sesame") as (server, _):
        port = _port(server)
        refused = ["/ws", "/ws?token=", "/ws?token=sesam", "/ws?token=sesamee", "/ws?token=SESAME", "/ws?TOKEN=sesame",
                   "/ws?token=x&token=sesame", "/ws#token=sesame", "/ws;token=sesame", "/ws?token[]=sesame",
                   "/ws?token=%00sesame", "/ws?token=sesame%00"]  # fmt: skip
        for path in refused:
            assert _handshake(port, path) in (401, 404), path
        assert _status(_get(port, "/?token=wrong")) == 401
        assert _status(_get(port, "/", host="evil.example")) == 401, "no page without the token, whatever the name"
        assert _handshake(port, "/ws?token=sesame") == 101
        assert _handshake(port, "/ws?token=%73esame") == 101, "percent-encoding is the same token"
        assert _status(_get(port, "/?token=sesame")) == 200


# -- HTTP -------------------------------------------------------------------------------------------


def test_http_methods_and_paths(open_server):
    server, _ = open_server
    port = _port(server)
    page = _get(port, "/")
    assert _status(page) == 200 and b"<canvas" in page
    head = _get(port, "/", method="HEAD")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    assert _status(head) == 200 and head.endswith(b"\r\n\r\n") and length == len(page.split(b"\r\n\r\n", 1)[1])
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"]:
        answer = _get(port, "/", method=method)
        assert _status(answer) == 405 and b"Allow: GET, HEAD" in answer, method
    assert _status(_get(port, "/ws", method="POST")) == 405
    assert _status(_get(port, "/favicon.ico")) == 200


def test_no_path_leads_to_a_file(open_server):
    server, _ = open_server
    port = _port(server)
    secret = Path(__file__).read_bytes()[:200]
    for path in ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc/passwd", "//etc/passwd",
                 "/index.html/../../server.py", "/viewer.html", "/server.py",
                 "/.%2e/tests/serving/test_serving_attacks.py", "/%00", "/static/../../etc/passwd"]:  # fmt: skip
        answer = _get(port, path)
        assert _status(answer) in (400, 404), path
        assert b"root:" not in answer and secret not in answer, path


# -- control messages -------------------------------------------------------------------------------


def test_binary_and_pickled_control_messages_are_refused_and_never_run(open_server, tmp_path):
    server, controls = open_server
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Exploit())
    with connect(f"ws://127.0.0.1:{_port(server)}/ws", max_size=2**24) as ws:
        for message in [payload, payload.decode("latin-1"), b'{"type": "pause"}', b"\xc3\x28"]:
            ws.send(message)
            assert _reply(ws)["type"] == "error", message
        assert not controls.snapshot().paused, "a binary message changed nothing"
    assert not marker.exists(), "the pickle ran"


def test_a_shared_stream_refuses_uploads_in_one_line(open_server):
    server, controls = open_server
    with connect(f"ws://127.0.0.1:{_port(server)}/ws", max_size=2**24) as ws:
        ws.send(b"ARCU\x89PNG\r\n\x1a\n" + b"\x00" * 64)
        assert "shared stream cannot start from an upload" in _reply(ws)["error"]


def test_text_that_is_not_utf8_closes_the_connection(open_server):
    """RFC 6455: invalid UTF-8 in a text message fails the connection (1007); the server lives on."""
    server, _ = open_server
    port = _port(server)
    with _silent_viewer(port) as sock:
        assert sock.recv(12).endswith(b"101")
        sock.sendall(bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]))  # FIN + text, masked with zeros
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert re.search(rb"\x88.\x03\xef", received, re.DOTALL), "a close frame with code 1007"
    assert _handshake(port) == 101


def test_prompts_the_packet_could_not_carry_are_refused(open_server):
    server, controls = open_server
    with connect(f"ws://127.0.0.1:{_port(server)}/ws", max_size=2**24) as ws:
        ws.send('{"type": "prompt", "text": "a \\ud800"}')
        assert "surrogate" in _reply(ws)["error"]
        ws.send(json.dumps({"type": "prompt", "text": "\U0001f642" * 501}, ensure_ascii=False))
        assert "bytes" in _reply(ws)["error"]
        ws.send(json.dumps({"type": "prompt", "text": "\U0001f642" * 500}, ensure_ascii=False))
        ack = _reply(ws)
        assert ack["type"] == "ack" and controls.snapshot().prompt == "\U0001f642" * 500


def test_the_ack_names_the_words_the_model_ignores(open_server):
    server, _ = open_server
    with connect(f"ws://127.0.0.1:{_port(server)}/ws") as ws:
        ws.send(json.dumps({"type": "prompt", "text": "a purple dragon flying"}))
        assert _reply(ws)["ignored"] == ["purple", "dragon"]
        ws.send(json.dumps({"type": "prompt", "text": PROMPT}))
        assert _reply(ws)["ignored"] == []


# -- floods -----------------------------------------------------------------------------------------


def test_a_connect_flood_leaves_viewers_served(open_server):
    """Hundreds of sockets that never finish a handshake, and dozens of viewers that never read."""
    server, _ = open_server
    port = _port(server)
    with ExitStack() as stack:
        for _ in range(200):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        for _ in range(30):
            stack.enter_context(_silent_viewer(port))
        ws = stack.enter_context(connect(f"ws://127.0.0.1:{port}/ws", max_size=2**24))
        frames = [m for m in (ws.recv(timeout=20) for _ in range(40)) if isinstance(m, bytes)]
        assert frames and decode_frame(frames[-1]).index > 0
        ws.send('{"type": "stats"}')
        stats = next(json.loads(m) for m in iter(lambda: ws.recv(timeout=20), None) if isinstance(m, str))
        assert stats["viewers"] >= 31


# -- starting -----------------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_with_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(OSError, match=r"^cannot serve on 127\.0\.0\.1:\d+: .*; choose another --port"):
            StreamServer(Controls(PROMPT), host="127.0.0.1", port=port, token=None).start()
        assert time.monotonic() - start < 10


def test_an_ipv6_address_is_printed_in_brackets():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = StreamServer(Controls(PROMPT), host="::1", port=0, token=None).start()
    except OSError:
        pytest.skip("::1 cannot be bound here")
    try:
        assert re.fullmatch(r"http://\[::1\]:\d+/", server.url)
    finally:
        server.stop()
