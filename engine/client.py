"""`python -m engine.client`: watch a stream from a script (engine/serving/client.py).

`from engine.client import StreamClient` is the Python entry point (see docs/serving.md)."""

import sys

from engine.serving.client import StreamClient

__all__ = ["StreamClient"]

if __name__ == "__main__":
    from engine.serving.client import main

    sys.exit(main())
