"""The tuning suite's figures (examples/benchmarks/suite.py) against numbers written out here, and one tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import suite  # noqa: E402  (its `common` puts examples/ on the path)

from data import prepare_fashion_mnist  # noqa: E402


def test_compare_and_summary_follow_their_definitions() -> None:
    # histories of (training seconds, step, test accuracy); BP's best is 0.80, reached at 20 s
    bp = {"history": [(10.0, 10, 0.60), (20.0, 20, 0.80), (30.0, 30, 0.75)], "final_acc": 0.75, "best_acc": 0.80,
          "train_seconds": 30.0, "steps": 30}  # fmt: skip
    dbp = {"history": [(12.0, 10, 0.70), (24.0, 20, 0.81), (36.0, 30, 0.78)], "final_acc": 0.78, "best_acc": 0.81,
           "train_seconds": 36.0, "steps": 30}  # fmt: skip
    never = {**dbp, "history": [(12.0, 10, 0.70), (24.0, 20, 0.79)], "final_acc": 0.79}
    one = suite.compare(bp, dbp)
    assert one["final_diff_pp"] == pytest.approx(3.0)
    assert one["speedup"] == pytest.approx(20.0 / 24.0)  # DBP first reaches 0.80 at 24 s
    assert one["step_ratio"] == pytest.approx(1.2)
    other = suite.compare(bp, never)
    assert other["speedup"] is None
    s = suite.summary([one, other])
    assert s["final_diff_pp"] == pytest.approx((3.0 + 4.0) / 2)
    assert (s["final_diff_min"], s["final_diff_max"]) == (pytest.approx(3.0), pytest.approx(4.0))
    assert s["speedup"] == pytest.approx(20.0 / 24.0) and s["reached"] == "1/2"  # the mean over seeds that reach it


def test_quick_suite_runs_bp_and_dbp_on_the_mlp(tmp_path: Path) -> None:
    root = tmp_path / "data"
    prepare_fashion_mnist(root, download=False)  # from /usr/share/datasets/fashion-mnist; never downloads
    out = tmp_path / "suite.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "suite.py"), "--quick", "--tasks", "mlp", "--data-dir", str(root),
         "--out", str(out), "--plot", str(tmp_path / "suite.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["tasks"]["mlp"]["runs"]
    assert len(runs["BP"]) == 1 and len(runs["{}"]) == 1
    assert runs["{}"][0]["finite"] and runs["{}"][0]["skipped"] == 0
    assert 0.5 < runs["BP"][0]["final_acc"] <= 1.0 and 0.5 < runs["{}"][0]["final_acc"] <= 1.0
    assert (tmp_path / "suite.png").stat().st_size > 0
