"""Lint in CI: `ruff check` with the rules of ruff.toml (pyflakes, syntax, a few bug-prone patterns)."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO as ROOT


def _ruff():
    path = os.path.join(os.path.dirname(sys.executable), "ruff")
    return path if os.path.exists(path) else shutil.which("ruff")


def test_the_code_passes_ruff():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (it is in requirements/cpu.txt: bash scripts/setup_env.sh)")
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_catch_an_unused_import_and_an_undefined_name(tmp_path):
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    result = subprocess.run([ruff, "check", "--no-cache", "--config", os.path.join(ROOT, "ruff.toml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "F401" in result.stdout and "F821" in result.stdout
