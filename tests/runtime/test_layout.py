"""Instance stepping is the only caller of the engine's step. import-linter forbids importing
``dsf_bridge.engine.interpreter`` elsewhere in the runtime; ``dsf_bridge.engine`` re-exports
``step``, which a module-level contract cannot see, so this test looks at the names."""

from __future__ import annotations

import ast
from pathlib import Path

import dsf_bridge.runtime

RUNTIME = Path(dsf_bridge.runtime.__file__).parent


def _imports_step(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsf_bridge.engine"):
            found.extend(
                f"{path.name}:{node.lineno} {node.module}.{alias.name}"
                for alias in node.names
                if alias.name in ("step", "interpreter")
            )
        elif isinstance(node, ast.Import):
            found.extend(
                f"{path.name}:{node.lineno} {alias.name}"
                for alias in node.names
                if alias.name.startswith("dsf_bridge.engine.interpreter")
            )
    return found


def test_only_stepping_reaches_the_engines_step() -> None:
    modules = sorted(RUNTIME.glob("*.py"))
    assert len(modules) > 10
    offending = [
        hit for path in modules if path.name != "stepping.py" for hit in _imports_step(path)
    ]
    assert offending == []
    assert _imports_step(RUNTIME / "stepping.py")  # the check itself sees an import
