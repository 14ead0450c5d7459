"""Print the project's runtime dependencies from pyproject.toml, one per line, minus some.

    python docker/requirements.py --exclude torch torchvision > requirements.txt

The images install torch from a chosen index (CPU or CUDA wheels) or not at all (the API),
then these requirements from PyPI, then the project itself with `pip install --no-deps`, so
pip can never swap in a different torch build. Standard library only (runs before any install).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, exclude: set[str]) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    skip = {canonical(e) for e in exclude}
    kept = []
    for dep in deps:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", dep)
        if name is None:
            raise SystemExit(f"cannot read the project name of dependency {dep!r}")
        if canonical(name.group(1)) not in skip:
            kept.append(dep)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    p.add_argument("--exclude", nargs="*", default=[], help="project names to leave out")
    args = p.parse_args()
    print("\n".join(requirements(args.pyproject, set(args.exclude))))


if __name__ == "__main__":
    main()
