"""One rank of a sessions server on rank groups with the demo model (tests/parallel/test_group_server.py).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/support/group_server_worker.py DIR [stream flags]

The real entry point's sessions path (launch/stream.py serve_sessions: links, group casts, desks,
signals) with the preset's real model on every rank; admission counts memory only (the speed
a loaded 2-core machine measures would let one session in, and which one is not what is tested).
The manager of rank r raises in its next round once the file DIR/fail<r> exists.
"""

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from engine.devices import resolve_dtype  # noqa: E402
from engine.serving.sessions import SessionManager  # noqa: E402
from launch.build import build_session  # noqa: E402
from launch.cli import rank_device, speed_from_args, weights_from_args  # noqa: E402
from launch.run import on_ranks  # noqa: E402
from launch.stream import parse_args, serve_sessions, session_limits, sessions_preset  # noqa: E402


class FailOnSignal(SessionManager):
    trigger: Path

    def step_streams(self, streams):
        if self.trigger.exists():
            raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
        return super().step_streams(streams)


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    args = parse_args(argv)

    def make(topology):
        def manager(outbox):
            device = rank_device(args, topology)
            session = build_session(sessions_preset(args, topology), weights_from_args(args), device,
                                    resolve_dtype(args.dtype, device), topology=topology,
                                    speed=speed_from_args(args))  # fmt: skip
            limits = dataclasses.replace(session_limits(args), throughput_admission=False)
            made = FailOnSignal(session, limits, outbox=outbox)
            made.trigger = out / f"fail{topology.rank}"
            return made

        return manager

    return on_ranks(args, lambda topology: serve_sessions(args, topology, make_manager=make(topology)))[0]


if __name__ == "__main__":
    sys.exit(main())
