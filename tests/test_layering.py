"""Dependencies point one way (ARCHITECTURE.md): the engine imports nothing from the service,
the workers or the clients, nor their frameworks; torch-free modules stay torch-free."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINE = {"service", "workers", "clients", "fastapi", "celery", "redis", "uvicorn", "httpx"}


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_engine_imports_nothing_from_the_layers_above():
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN_IN_ENGINE)
        for p in (ROOT / "smoothcert").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_torch_free_modules_do_not_load_torch():
    code = ("import sys, smoothcert, smoothcert.bounds, smoothcert.adaptive, smoothcert.imageio; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
