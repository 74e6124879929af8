"""One rank of a sessions server whose replicas run model-free managers (tests/parallel/test_replicas.py).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/support/replica_worker.py DIR [stream flags]

The real entry point's sessions path (launch/stream.py serve_sessions: links, replicas, signals)
with tests/support/serve_fakes.py's manager on every rank. The manager of rank r fails at its next round
once the file DIR/fail<r> exists.
"""

import os
import sys
from pathlib import Path

# The repository root; serve_fakes needs nothing: a script run by path has its own folder on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serve_fakes import FakeManager  # noqa: E402

from launch.run import on_ranks  # noqa: E402
from launch.stream import parse_args, serve_sessions  # noqa: E402


class FailOnSignal(FakeManager):
    def __init__(self, trigger: Path, **options):
        super().__init__(**options)
        self.trigger = trigger

    def round(self):
        if self.trigger.exists():
            self.explode()
        return super().round()


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    args = parse_args([*argv, "--replicas", os.environ["WORLD_SIZE"]])  # one replica per rank
    make = lambda outbox: FailOnSignal(out / f"fail{rank}", name=f"r{rank}-", capacity=3)  # noqa: E731
    return on_ranks(args, lambda topology: serve_sessions(args, topology, make_manager=make))[0]


if __name__ == "__main__":
    sys.exit(main())
