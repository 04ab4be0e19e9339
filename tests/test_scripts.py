"""scripts/setup-venv.sh: the run command installs what running needs, the test command
adds the dev extras, and each remembers what the other installed (pip is stood in for:
these tests check what would be installed, without a network)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support import ROOT

# The .venv's python: pip calls are written down instead of run; the rest is real.
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = -m ] && [ "$2" = pip ]; then
    shift 2
    printf '%s\\n' "$*" >>"$(dirname "$0")/../pip.log"
    exit 0
fi
exec {python} "$@"
"""


def checkout(tmp_path: Path) -> Path:
    """The scripts and pyproject.toml in a directory of their own, with a .venv whose
    python is :data:`FAKE_PYTHON`."""
    root = tmp_path / "mailroom"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    return root


def setup_venv(root: Path, *args: str) -> tuple[str, list[str]]:
    """Run scripts/setup-venv.sh; what it said, and the pip commands it ran."""
    done = subprocess.run(
        ["bash", "scripts/setup-venv.sh", *args],
        cwd=root,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    log = root / ".venv" / "pip.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return done.stdout + done.stderr, calls


def test_run_installs_only_what_running_needs_and_test_adds_only_the_extras(
    tmp_path: Path,
) -> None:
    root = checkout(tmp_path)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]["dev"]

    said, calls = setup_venv(root)  # as scripts/run.sh does
    assert calls == ["install --upgrade pip", "install -e ."]  # no -q: pip shows progress
    assert "installing Mailroom and the packages it needs to run" in said
    assert "the first time this takes a minute or two" in said

    said, calls = setup_venv(root, "--dev")  # scripts/test.sh after scripts/run.sh
    assert calls == ["install " + " ".join(extras)]
    assert "installing the development tools" in said

    for args in ((), ("--dev",)):  # both again: nothing to do, nothing said
        assert setup_venv(root, *args) == ("", [])


def test_test_first_then_run_installs_nothing_more(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    _, calls = setup_venv(root, "--dev")
    assert calls == ["install --upgrade pip", "install -e .[dev]"]
    assert setup_venv(root) == ("", [])  # scripts/run.sh after scripts/test.sh
    # A changed pyproject.toml: each command installs again, once.
    with (root / "pyproject.toml").open("a") as pyproject:
        pyproject.write("# changed\n")
    assert setup_venv(root)[1] == ["install --upgrade pip", "install -e ."]
    assert setup_venv(root)[1] == []
    assert setup_venv(root, "--dev")[1][0].startswith("install pytest")
    assert setup_venv(root, "--dev")[1] == []
