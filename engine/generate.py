"""`python -m engine.generate` and `torchrun ... -m engine.generate`: the entry point users know.

The command lives in launch/generate.py (where runtimes are assembled from presets); this shim
only hands over, so that the engine package itself never imports launch/ at import time.
"""

import sys

if __name__ == "__main__":
    from launch.generate import entry

    sys.exit(entry())
