"""The overhead benchmark's argument check (examples/benchmarks/overhead.py): a run that would time fewer than three
steps per fit is refused before anything trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OVERHEAD = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "overhead.py"


def test_steps_that_leave_fewer_than_three_timed_steps_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(OVERHEAD), "--zoo", "--steps", "16", "--warmup", "15", "--out", "/dev/null"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2  # argparse's usage error, before any fit
    assert "--steps 16 --warmup 15 would time 1 step(s) per fit; time at least 3 (e.g. --steps 24)" in done.stderr
