"""The overhead benchmark's argument checks (examples/benchmarks/overhead.py): runs whose timed steps would mean
nothing are refused before anything trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OVERHEAD = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "overhead.py"


def refused(*args: str) -> str:
    done = subprocess.run([sys.executable, str(OVERHEAD), *args, "--out", "/dev/null"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]  # argparse's usage error, before any fit
    return done.stderr


def test_steps_that_leave_fewer_than_three_timed_steps_are_refused() -> None:
    message = refused("--zoo", "--steps", "16", "--warmup", "15")
    assert "--steps 16 --warmup 15 would time 1 step(s) per fit; time at least 3 (e.g. --steps 24)" in message


def test_a_warm_up_shorter_than_the_plan_needs_is_refused() -> None:
    # through Trainer.fit: the 5 measured steps and the one that applies the plan
    message = refused("--models", "mlp", "--methods", "BP", "DBP defaults", "--steps", "12", "--warmup", "6")
    assert "--warmup must be >= 7 for the cost plan: 5 steps measure, the next applies the plan" in message
    # with the steps interleaved: the plan's checks too; BP alone has no plan and needs none
    message = refused("--models", "mlp", "--steps", "26", "--warmup", "16", "--interleave-steps")
    assert "--interleave-steps needs --warmup >= 17 for the cost plan: 5 steps measure" in message
