"""Test-session settings that must precede torch's import.

OpenMP threads wait passively: the suite shares its cores with other processes (and its own
torchrun workers, which inherit this), and spinning waiters made it 5-10x slower under load.
launch/threads.py says why; this is the same choice for the test process.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
