"""The README and the pages it sends people to say what is true: their code runs as written,
their links lead somewhere, and the install `make` performs imports the package from any
folder, the clone's parent included."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from smoothcert.architectures import build_architecture
from smoothcert.bundle import ModelSpec, save_bundle
from tests import test_e2e as e2e

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

stack = e2e.stack  # the real stack (redis-server, a Celery worker, uvicorn), for the demo


def code_block(heading: str, page: Path = README, lang: str = "python", index: int = 0) -> str:
    """The `index`-th `lang` code block after `heading` (and before the next heading of the
    same or a higher level) in `page`."""
    text = page.read_text()
    start = text.index(heading + "\n")
    level = heading.split(" ", 1)[0]
    end = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.MULTILINE)
    section = text[start:start + len(heading) + end.start()] if end else text[start:]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.DOTALL)[index]


def python_block(heading: str, page: Path = README) -> str:
    """The first Python code block after `heading` in `page`."""
    return code_block(heading, page)


def replaced(code: str, *pairs: tuple[str, str]) -> str:
    """`code` with each (old, new) replaced; each old must occur, so an edited page cannot
    silently make its test run at full size."""
    for old, new in pairs:
        assert old in code, f"{old!r} is no longer in the example: update the test"
        code = code.replace(old, new)
    return code


def test_engine_examples_run(tmp_path):
    spec = ModelSpec.from_json({"name": "digits", "input_shape": [1, 8, 8], "num_classes": 10,
                                "sigma": {"default": 0.25, "min": 0.05, "max": 1.0},
                                "normalize": {"mean": [0.5], "std": [0.5]}, "architecture": "digits_cnn"})
    torch.manual_seed(0)
    save_bundle(tmp_path / "b", spec, build_architecture("digits_cnn", (1, 8, 8), 10).eval(), fmt="state_dict")
    page = DOCS / "engine.md"
    code = replaced(python_block("## Certify in Python", page), ("path/to/bundle", str(tmp_path / "b")),
                    ("n=100_000", "n=2_000"), ('SigmaSearch("ddrs")', 'SigmaSearch("ddrs", steps=3)'),
                    ("memory=memory, alpha=0.001)", "memory=memory, alpha=0.001, n=2_000)"))
    scope: dict = {}
    exec(compile(code, "engine.md", "exec"), scope)  # noqa: S102 - our own docs
    assert scope["cert"].memory.outcome in ("new", "inside", "shrunk")
    code = replaced(python_block("## Sampling: fixed, adaptive, sequential", page), ("n=100_000", "n=2_000"))
    exec(compile(code, "engine.md", "exec"), scope)  # noqa: S102
    assert scope["cert"].sampling == "sequential" and scope["cert"].target_radius == 0.5
    assert scope["cert"].n <= scope["cert"].n_max == 2_000


def test_readme_set_up_is_the_two_make_targets():
    lines = [line.split("#")[0].strip() for line in code_block("## Set up", lang="sh").splitlines()]
    assert lines == ["make up", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^up: ", makefile, re.MULTILINE) and re.search(r"^test: ", makefile, re.MULTILINE)


def test_readme_demo_prints_what_the_readme_shows(stack):
    (command,) = code_block("## Try it", lang="sh").strip().splitlines()
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/smoothcert"
    shown = code_block("## Try it", lang="text").strip()
    env = dict(os.environ, SMOOTHCERT_URL=stack, SMOOTHCERT_API_KEY=e2e.USER)
    out = subprocess.run([sys.executable, "-m", "smoothcert.cli", *argv[1:], "--n", "2000"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    # The same line, numbers aside (this run has another seed and n).
    number = r"\d+(?:\.\d+)?"
    pattern = number.join(re.escape(part) for part in re.split(number, shown))
    assert re.fullmatch(pattern, out.stdout.strip()), (shown, out.stdout)
    assert "class 7 (7)" in out.stdout


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)


def test_links_in_the_readme_and_docs_lead_somewhere():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", _prose(linked), re.MULTILINE)}
                if anchor not in anchors:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_makefiles_install_imports_the_package_from_the_clones_parent(tmp_path):
    """`git clone …/smoothcert` makes a folder named like the package. Python run from its
    parent puts that folder first on its path; with setuptools' default (strict) editable
    install the clone is then imported as a namespace package, hiding the real one. The
    Makefile's install line must avoid that (compat mode puts the clone on the path).

    The line is run as written, offline: into a fresh venv that sees this environment's
    packages, without dependencies or build isolation."""
    makefile = (ROOT / "Makefile").read_text().splitlines()
    (line,) = [line for line in makefile if "pip install" in line and " -e " in line]
    args = shlex.split(line.split("pip install", 1)[1])
    clone = tmp_path / "smoothcert"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    for package in ("smoothcert", "service", "workers", "clients"):
        shutil.copytree(ROOT / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # pip, setuptools, torch...
    args = [str(clone) if a.startswith(".[") else a for a in args]
    install = subprocess.run([python, "-m", "pip", "install", *args, "--no-deps", "--no-build-isolation",
                              "--ignore-installed", "--no-index"], cwd=clone, capture_output=True, text=True,
                             timeout=300, check=False)
    assert install.returncode == 0, install.stdout + install.stderr
    probe = "import smoothcert; from smoothcert import Certifier; print(smoothcert.__file__)"
    for where in (tmp_path, clone):
        out = subprocess.run([python, "-c", probe], cwd=where, capture_output=True, text=True, timeout=120,
                             check=False)
        assert out.returncode == 0, (where, out.stderr)
        assert out.stdout.strip() == str(clone / "smoothcert" / "__init__.py"), where

