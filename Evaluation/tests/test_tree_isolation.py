"""DESIGN.md: the trees share files on disk, never code. This tree must not import another tree's package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
OWN = "etchr_eval"
OTHERS = {"etchr_sft", "etchr_rl"}


def _imported_top_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            mods.add(str(node.args[0].value).split(".")[0])
    return mods


def test_no_source_file_imports_another_tree():
    files = [p for p in TREE.rglob("*.py") if ".venv" not in p.parts]
    assert len(files) >= 3
    offenders = {str(p.relative_to(TREE)): sorted(_imported_top_modules(p) & OTHERS) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_package_loads_no_other_tree():
    code = (f"import sys, pkgutil, importlib, {OWN}\n"
            f"for m in pkgutil.walk_packages({OWN}.__path__, '{OWN}.'):\n"
            f"    importlib.import_module(m.name)\n"
            f"print(sorted(n for n in sys.modules if n.split('.')[0] in {sorted(OTHERS)!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_the_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    other = sorted(OTHERS)[0]
    bad.write_text(f"def f():\n    from {other}.config import load_config\n    import importlib\n"
                   f"    importlib.import_module('{other}')\n")
    assert _imported_top_modules(bad) & OTHERS == {other}
