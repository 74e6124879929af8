"""Set up the ranks for one run and tear them down, whatever happens.

    with launched(ParallelConfig(...)) as topology:
        ...

SIGTERM (what torchrun sends the survivors when a rank dies) becomes a normal exception, so
`finally` blocks run and outputs are closed. A failure on any rank is re-raised as `RankFailure`
with a message naming the rank and the cause (parallel/faults.py).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from parallel.topology import ParallelConfig, Topology


class RankFailure(RuntimeError):
    """A rank of a multi-process run failed; the message says which and why."""


def _terminate(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


@contextmanager
def launched(cfg: ParallelConfig, alike: tuple[type[BaseException], ...] = ()) -> Iterator[Topology]:
    """`alike`: errors every rank raises the same way (a plan the ranks cannot run, a bad flag):
    re-raised as they are, so that the entry point says them once instead of once per rank."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    topology = Topology.from_env(cfg)
    topology.faults.register()
    try:
        yield topology
    except (Exception, SystemExit) as err:
        if not topology.distributed or isinstance(err, alike):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the report; torchrun's SIGKILL still bounds it
        raise RankFailure(topology.faults.report(err)) from err
    finally:
        topology.close()
        signal.signal(signal.SIGTERM, previous)
