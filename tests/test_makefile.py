"""Every command line the Makefile passes to a script starts: its arguments are parsed and checked by the script's own
``parse_args`` (what the script does before anything trains), so a target that would exit with a usage error, such as
a GPU target nobody could run on a CPU machine, fails here."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text()


def recipes() -> dict[str, list[str]]:
    """Each target's recipe lines, continuation lines joined and the Makefile's variables substituted."""
    text = MAKEFILE.replace("\\\n", " ")
    variables = dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, flags=re.MULTILINE))
    out: dict[str, list[str]] = {}
    target = None
    for line in text.splitlines():
        if re.match(r"^[A-Za-z][\w.-]*:", line) and not line.startswith("\t"):
            target = line.split(":", 1)[0]
            out[target] = []
        elif line.startswith("\t") and target is not None:
            command = line.strip()
            for _ in range(3):  # variables that name variables
                command = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), command)
            out[target].append(command)
    return out


def script_calls() -> list[tuple[str, Path, list[str]]]:
    """(target, script, arguments) of every recipe line that runs a Python script of this repository."""
    calls = []
    for target, lines in recipes().items():
        for command in lines:
            tokens = shlex.split(command)
            scripts = [i for i, t in enumerate(tokens) if t.endswith(".py") and (ROOT / t).is_file()]
            if scripts:
                calls.append((target, ROOT / tokens[scripts[0]], tokens[scripts[0] + 1 :]))
    return calls


def pytest_calls() -> list[tuple[str, list[str]]]:
    """(target, arguments after ``-m pytest``) of every recipe line that runs pytest."""
    calls = []
    for target, lines in recipes().items():
        for command in lines:
            tokens = shlex.split(command)
            if "pytest" in tokens and tokens[tokens.index("pytest") - 1] == "-m":
                calls.append((target, tokens[tokens.index("pytest") + 1 :]))
    return calls


def load(script: Path) -> ModuleType:
    sys.path.insert(0, str(script.parent))  # its neighbours (common, models), as when it runs
    try:
        spec = importlib.util.spec_from_file_location(f"makefile_{script.stem}", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(script.parent))


def test_the_makefile_runs_the_scripts_it_should() -> None:
    assert [target for target, _ in pytest_calls()] == ["test", "gpu-check"]
    targets = {target for target, _, _ in script_calls()}
    assert {"gpu-check", "benchmark", "demo"} <= targets
    gpu = [args for target, _, args in script_calls() if target == "gpu-check"]
    assert len(gpu) == 3 and all("--device" in a and a[a.index("--device") + 1] == "cuda" for a in gpu)


@pytest.mark.parametrize("call", script_calls(), ids=lambda c: f"{c[0]}:{c[1].name}")
def test_every_script_call_of_the_makefile_parses(call: tuple[str, Path, list[str]]) -> None:
    target, script, args = call
    module = load(script)
    try:
        module.parse_args(args)
    except SystemExit as exit:  # argparse's usage error (status 2), printed to stderr
        pytest.fail(f"`make {target}`: {script.name} {shlex.join(args)} exits with status {exit.code}")


@pytest.mark.parametrize("call", pytest_calls(), ids=lambda c: c[0])
def test_every_pytest_call_of_the_makefile_names_existing_tests_and_markers(call: tuple[str, list[str]]) -> None:
    target, args = call
    pyproject = (ROOT / "pyproject.toml").read_text()
    for i, arg in enumerate(args):
        if arg == "-m":
            assert f'"{args[i + 1]}:' in pyproject, f"`make {target}`: marker {args[i + 1]!r} is not registered"
        elif not arg.startswith("-") and args[i - 1] != "-m":
            assert (ROOT / arg).exists(), f"`make {target}`: {arg} does not exist"
