"""Checks for the service's command-line values, as argparse `type=` functions: a bad value is
one line from argparse, before anything loads."""

from __future__ import annotations

import argparse

from engine.serving.access import parse_origin
from engine.serving.protocol import ProtocolError, clean_prompt


def port(text: str) -> int:
    """A TCP port to listen on: 0 (any free one) to 65535."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0 to 65535 (0: any free one)")
    return number


def prompt(text: str) -> str:
    """A prompt viewers could also send (the same rules, engine/serving/protocol.py)."""
    try:
        return clean_prompt(text)
    except ProtocolError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def origin(text: str) -> str:
    """An origin allowed to open the stream's WebSocket: scheme://host[:port], or *."""
    try:
        return parse_origin(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def ice_server(text: str) -> dict:
    """A STUN or TURN server for WebRTC: stun:HOST[:PORT] or turn:USER:PASS@HOST[:PORT]."""
    from engine.serving.webrtc import parse_ice_server

    try:
        return parse_ice_server(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mebibytes(text: str) -> int:
    """A memory size in MiB, at least 1."""
    return _positive(text, int, "a whole number of MiB")


def seconds(text: str) -> float:
    """A duration in seconds, more than 0."""
    return _positive(text, float, "a number of seconds")


def count(text: str) -> int:
    """A whole number, at least 1."""
    return _positive(text, int, "a whole number")


def _positive(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}: give a number above 0")
    return value
