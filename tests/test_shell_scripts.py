"""Every shell script of the repository (found by its ``#!`` line, outside .venv and .git) passes
shellcheck. CI installs shellcheck (.ci/run) and sets ``NYXRAY_REQUIRE_SHELLCHECK=1``, so there a
missing shellcheck fails the test instead of skipping it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}


def shell_scripts() -> list[str]:
    """Paths (relative to the repository) of files whose first line runs sh or bash."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    first = f.readline(200)
            except OSError:
                continue
            if first.startswith(b"#!") and any(first.rstrip().endswith(s) for s in (b"/sh", b"/bash", b" sh", b" bash")):
                found.append(os.path.relpath(path, REPO))
    return found


def test_the_known_scripts_are_found():
    assert {"dev.sh", os.path.join(".ci", "run"), os.path.join("cluster", "submit.sh")} <= set(shell_scripts())


@pytest.mark.parametrize("script", shell_scripts())
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        if os.environ.get("NYXRAY_REQUIRE_SHELLCHECK") == "1":
            pytest.fail("shellcheck is not installed (.ci/run installs it: apt-get install shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "--external-sources", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
