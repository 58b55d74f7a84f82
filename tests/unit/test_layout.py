"""The agent/lab split: node_helper never imports the lab; the lab may import node_helper."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imported_top_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_agent_module_imports_the_lab() -> None:
    offenders = {str(p.relative_to(REPO)) for p in (REPO / "node_helper").rglob("*.py")
                 if "lab" in _imported_top_names(p)}
    assert offenders == set()


def test_the_agent_cli_loads_no_lab_module() -> None:
    code = ("import sys, node_helper.cli, node_helper.sockets, node_helper.vm.api, "
            "node_helper.doctor; node_helper.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'lab' or m.startswith('lab.')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert res.stdout.strip() == "[]"


def test_the_lab_does_import_the_agent() -> None:
    """The check above can fail: the lab's own modules do pull in node_helper."""
    code = ("import sys, lab.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('node_helper')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert "node_helper.kernel" in res.stdout
