"""`python -m engine.client`: watch a stream from a script (engine/serving/client.py)."""

import sys

if __name__ == "__main__":
    from engine.serving.client import main

    sys.exit(main())
