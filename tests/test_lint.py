"""Lint in CI: `ruff check` and `ruff format --check` with ruff.toml (pyflakes, syntax, a few bug-prone
patterns, the formatter), and the rule that every blocking wait in the tests has a timeout."""

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
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (it is in requirements/cpu.txt: bash scripts/setup_env.sh)")
    result = subprocess.run(
        [ruff, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, "run `.venv/bin/ruff format .`:\n" + result.stdout + result.stderr


def test_the_rules_catch_an_unused_import_and_an_undefined_name(tmp_path):
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    result = subprocess.run(
        [ruff, "check", "--no-cache", "--config", os.path.join(ROOT, "ruff.toml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "F401" in result.stdout and "F821" in result.stdout


# --------------------------------------------------------------------------- waits in the tests
BLOCKING = {"wait", "join", "get", "communicate"}
"""Methods that block until another process or thread acts (Popen, Process, Thread, Queue, Event)."""


def untimed_waits(source: str, path: str) -> list:
    """``path:line`` of each call that can block forever: ``subprocess.run``/``check_output`` without
    ``timeout=``, and ``x.wait()``, ``x.join()``, ``x.get()``, ``x.communicate()`` without arguments."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, owner = node.func.attr, getattr(node.func.value, "id", None)
        timed = any(k.arg == "timeout" for k in node.keywords)
        if owner == "subprocess" and name in ("run", "check_output", "check_call", "call") and not timed:
            found.append(f"{path}:{node.lineno}")
        elif name in BLOCKING and not node.args and not node.keywords:
            found.append(f"{path}:{node.lineno}")
    return found


def test_every_blocking_wait_in_the_tests_has_a_timeout():
    """A hung rank or tool fails its test with a message instead of stalling CI until its global limit."""
    tests = os.path.join(ROOT, "tests")
    found = []
    for folder, _, files in os.walk(tests):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    found += untimed_waits(f.read(), os.path.relpath(path, ROOT))
    assert not found, f"blocking calls without a timeout: {found}"


def test_the_wait_rule_catches_what_it_names():
    bad = "import subprocess\nsubprocess.run(['x'])\nq.get()\np.join()\nproc.wait()\n"
    good = "import subprocess\nsubprocess.run(['x'], timeout=5)\nq.get(timeout=5)\nos.path.join(a)\nd.get('k')\n"
    assert untimed_waits(bad, "f.py") == ["f.py:2", "f.py:3", "f.py:4", "f.py:5"]
    assert untimed_waits(good, "f.py") == []
