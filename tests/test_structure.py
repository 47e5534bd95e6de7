"""The package's import arrows: math <- layers <- engine <- callback / metric / pictures, and Lightning only on the
callback side (read from the source with ``ast``, so a lazy import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_decor"

# What each module may import from the package (its level and below), and whether it may import Lightning.
ALLOWED: dict[str, tuple[set[str], bool]] = {
    "checks": (set(), False),
    "precision": (set(), False),
    "functional": ({"precision"}, False),
    "config": ({"checks", "functional"}, False),
    "im2col": (set(), False),
    "rows": (set(), False),
    "memory": (set(), False),
    "plan": ({"memory"}, False),
    "distributed": (set(), False),
    "layers": ({"functional", "im2col", "rows"}, False),  # not the cost model
    "checkpoint": ({"layers", "plan"}, False),
    "patching": ({"checks", "layers", "memory", "plan"}, False),
    "attention": ({"layers", "functional", "patching", "rows"}, False),
    "averaging": ({"layers", "patching"}, False),
    "huggingface": ({"functional", "layers", "patching"}, False),
    "timm_layers": ({"layers", "patching"}, False),
    "reports": ({"config", "layers", "patching", "plan"}, False),
    "sharing": ({"functional", "layers", "memory", "plan", "rows", "update"}, False),
    # the probe, and the planner's bridge to modules
    "probe": ({"config", "functional", "layers", "plan", "planner", "rows"}, False),
    "planner": ({"plan"}, False),  # modules only through callables: its tests need no model
    "update": ({"config", "distributed", "functional", "layers"}, False),
    "engine": (
        {
            "checkpoint",
            "config",
            "distributed",
            "functional",
            "layers",
            "memory",
            "patching",
            "plan",
            "planner",
            "probe",
            "reports",
            "rows",
            "sharing",
            "update",
        },
        False,
    ),
    "metric": ({"functional"}, False),  # torchmetrics, not Lightning
    "pictures": ({"functional", "layers", "rows"}, True),
    "trainer": (set(), True),  # what the callback reads of Lightning's Trainer
    "callback": (
        {
            "checks",
            "config",
            "engine",
            "functional",
            "layers",
            "metric",
            "patching",
            "pictures",
            "plan",
            "planner",
            "reports",
            "rows",
            "trainer",
            "update",
        },
        True,
    ),
}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "lightning_decor":
                found |= {f"lightning_decor.{alias.name}" for alias in node.names}
    return found


def test_every_module_imports_only_downwards_and_lightning_only_on_the_callback_side() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(ALLOWED), "a new module needs its place in ALLOWED"
    for name, (allowed, lightning) in ALLOWED.items():
        found = imports(PACKAGE / f"{name}.py")
        own = {m.split(".")[1] for m in found if m.startswith("lightning_decor.")}
        assert own <= allowed, f"{name} imports {sorted(own - allowed)} from above"
        uses_lightning = any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in found)
        assert uses_lightning <= lightning, f"{name} imports Lightning"
