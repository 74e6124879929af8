"""`python -m engine.stream` and `torchrun ... -m engine.stream`: the entry point users know.

The service lives in launch/stream.py (where runtimes are assembled from presets); this shim
only hands over, so that the engine package itself never imports launch/ at import time.
"""

import sys

if __name__ == "__main__":
    from launch.stream import entry

    sys.exit(entry())
