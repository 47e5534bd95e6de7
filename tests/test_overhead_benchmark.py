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
    # the planning steps, through Trainer.fit or with the steps interleaved: R moves only after them
    message = refused("--models", "mlp", "--methods", "BP", "DBP defaults", "--steps", "26", "--warmup", "16")
    assert (
        "--warmup must be >= 17 for the cost plan: R moves after its planning steps (5 measure the plain step, "
        "the rest check the plan)" in message
    )
    # update_every=2 checks the plan over windows of two steps: 27 planning steps
    message = refused("--models", "mlp", "--methods", "BP", "DBP update_every=2", "--steps", "36", "--warmup", "17")
    assert "--warmup must be >= 27 for the cost plan" in message
