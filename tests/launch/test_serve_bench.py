"""The serve bench through the real server: Poisson viewers over loopback WebSockets, model-free.

    pytest tests/launch/test_serve_bench.py

The manager is tests/support/serve_fakes.py's (paced like a real stream, a fixed number of sessions), behind
the real server; the viewers are the bench's (launch/benchmarks/serve_clients.py). Assertions are on
counts and bounds, none on how fast this machine is.
"""

from argparse import Namespace

import numpy as np
import pytest
from serve_fakes import FakeManager

from engine.config import ConfigError
from launch.benchmarks.serve import POLICIES, check_flags, make_trace, measure, summarize


def test_viewers_through_the_server_measure_what_they_receive():
    args = Namespace(seconds=3.0, watch_s=1.5, switch_s=0.5, patience_s=1.0)
    trace = make_trace(4.0, args, np.random.default_rng(0))  # 4 sessions offered: 8 arrivals in 3 s
    manager = FakeManager(capacity=2, fps=16, grace_s=0.0)  # refuses a third session (retry in 2.5 s)
    wall, peak = measure(manager, trace, args, "server")
    row = summarize(4.0, 4.0, "engine", trace, wall, manager)
    assert len(trace) == 8 and row["admitted"] + row["refused"] == len(trace)
    assert 1 <= row["admitted"] < len(trace) and 1 <= peak <= 2, (row, peak)
    assert 0.0 <= row["cpr"] <= 1.0 and row["stall_s_per_min"] >= 0.0, row
    assert row["ttff_p99_s"] >= row["ttff_p50_s"] > 0.0 and row["video_fps"] > 0.0, row
    watched = [v for v in trace if v.sid is not None]
    assert all(v.frames > 0 and v.first_frame_at >= v.arrival and v.left_at >= v.admitted_at for v in watched)
    assert all(0.0 <= v.stats["stall_s"] <= v.watched_s for v in watched)
    assert manager.refused >= 1 and len(set(v.sid for v in watched)) == len(watched)  # each viewer its own session


def test_flags_that_would_do_nothing_are_refused():
    base = dict(through="manager", max_viewers=None, policies=["engine", "fifo"], offered=None, layouts=None,
                quick=False, loads=[0.5, 1.0, 2.0])  # fmt: skip
    check_flags(Namespace(**base))
    with pytest.raises(ConfigError, match="--offered sets the load of --layouts runs"):
        check_flags(Namespace(**{**base, "offered": 2.0}))
    with pytest.raises(ConfigError, match="--layouts runs the engine behind the real server"):
        check_flags(Namespace(**{**base, "layouts": ["1x2"], "through": "server"}))
    check_flags(Namespace(**{**base, "layouts": ["1x2"], "policies": list(POLICIES), "offered": 2.0}))
    with pytest.raises(ConfigError, match="--max-viewers bounds --through server"):
        check_flags(Namespace(**{**base, "max_viewers": 8}))
    with pytest.raises(ConfigError, match="--through server serves the policies"):
        check_flags(Namespace(**{**base, "through": "server", "policies": ["fifo"]}))
