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
