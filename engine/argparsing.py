"""Command lines whose mistakes are one line: the error and where to look, not a usage block.

argparse prints the whole usage (every preset, every choice) above a bad value's message; for
commands with dozens of flags that buries the one line that matters. Abbreviated flags are
refused: with `--replicas` and `--replica-*` side by side, a typo must not silently pick one.
"""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
