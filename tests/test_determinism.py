"""The determinism contract (README, "Reproducible runs"), each run in its own process (tests/determinism_run.py: a
small CNN with dropout on shuffled data, ``seed_everything(0)``, through ``Trainer.fit``):

- same seed, arguments and machine give bit-identical runs with the default arguments: the first run measures and
  keeps its costs and every check's outcome in the plan cache, every later one replays them, even on a clock that
  says otherwise; under ``deterministic=True`` nothing timed decides anything;
- resuming from any checkpoint equals the uninterrupted run bit for bit;
- a run whose plan affords no layer is plain backpropagation bit for bit: the global RNG is never touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from conftest import checkout_env

SCRIPT = Path(__file__).with_name("determinism_run.py")


def run(out: Path, cache: Path, *args: str) -> dict[str, Any]:
    """One run of the script in a fresh process; its final raw state (W and R), plans and measured overheads."""
    out.mkdir(parents=True)
    env = {**checkout_env(), "LIGHTNING_DECOR_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"state": torch.load(out / "state.pt"), **json.loads((out / "plans.json").read_text())}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def moved(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, R in state.items() if n.endswith(".R") and not torch.equal(R, torch.eye(R.shape[-1]).expand_as(R))]


def test_two_processes_with_the_defaults_are_bit_identical(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run(tmp_path / "first", cache)
    assert first["plans"] and all(p["source"] == "measured" for p in first["plans"])
    assert moved(first["state"])  # the plan kept layers, and their R moved
    # A second run on a machine that now seems five times busier: timed, its check would remake the plan (it
    # measures DBP at more than 1.2 x the budget); it replays what the first run decided instead.
    second = run(tmp_path / "second", cache, "--skew", "0.25")
    assert all(p["source"] == "cache" for p in second["plans"])
    assert [p["layouts"] for p in second["plans"]] == [p["layouts"] for p in first["plans"]]
    assert min(second["overheads"]) > 1.2 * 0.1
    assert_identical(first["state"], second["state"])


def test_deterministic_mode_decides_nothing_by_timing(tmp_path: Path) -> None:
    # Each run with its own empty cache: the analytic plan, whatever the clock says (a budget it keeps layers in).
    args = ("--deterministic", "--max-overhead", "2.0")
    a = run(tmp_path / "a", tmp_path / "cache_a", *args)
    b = run(tmp_path / "b", tmp_path / "cache_b", *args, "--skew", "0.25")
    assert [p["source"] for p in a["plans"]] == ["analytic"] == [p["source"] for p in b["plans"]]
    assert moved(a["state"])
    assert_identical(a["state"], b["state"])
    assert not list((tmp_path / "cache_a").glob("*"))  # nothing timed, nothing kept
    # With the defaults and costs kept by an earlier run (not deterministic), deterministic runs replay them.
    measured = run(tmp_path / "measured", tmp_path / "cache")
    replayed = run(tmp_path / "replayed", tmp_path / "cache", "--deterministic", "--skew", "0.25")
    assert [p["layouts"] for p in replayed["plans"]] == [p["layouts"] for p in measured["plans"]]
    assert all(p["source"] == "cache" for p in replayed["plans"])


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # Lightning restores neither the global RNG nor a plain loader's position mid-epoch: with data and dropout drawn
    # from (epoch, batch) alone, plain backprop resumes exactly (checked first), and so must DBP with the defaults,
    # from a checkpoint during the plan's check (step 8) and from one after the planning steps (step 24).
    cache = tmp_path / "cache"
    for method, steps in ((("--bp",), (8,)), ((), (8, 24))):
        name = "bp" if method else "dbp"
        full = run(tmp_path / f"{name}_full", cache, "--positional", *method)  # 32 steps
        crashed = tmp_path / f"{name}_ckpt"
        crash = ("--ckpt-dir", str(crashed), "--crash-at", "28")
        run(tmp_path / f"{name}_crashed", cache, "--positional", *method, *crash)
        for step in steps:
            (path,) = crashed.glob(f"*step={step}.ckpt")
            resumed = run(tmp_path / f"{name}_resumed_{step}", cache, "--positional", *method, "--resume", str(path))
            assert_identical(full["state"], resumed["state"])
    assert moved(full["state"])


def test_a_plan_that_affords_no_layer_is_plain_backpropagation_bit_for_bit(tmp_path: Path) -> None:
    bp = run(tmp_path / "bp", tmp_path / "cache", "--bp")
    nothing = run(tmp_path / "nothing", tmp_path / "cache", "--max-overhead", "1e-9")
    assert [[form for form, _ in p["layouts"].values()] for p in nothing["plans"]] == [["plain"] * 4]
    assert_identical(bp["state"], nothing["state"])  # the same data order, dropout and weights
