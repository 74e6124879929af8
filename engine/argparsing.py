"""Command lines whose mistakes are one line: the error and where to look, not a usage block.

argparse prints the whole usage (every preset, every choice) above a bad value's message; for
commands with dozens of flags that buries the one line that matters.
"""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
