"""The README's first command: `replicator demo` replicates, verifies and drills, no cloud needed."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import cli
from tests.helpers import tree_digest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_opens_with_the_demo_and_the_test_command() -> None:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert block is not None
    assert block.group(1).splitlines() == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/replicator demo",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
    ]


def test_demo_replicates_verifies_drills_and_restores(tmp_path: Path) -> None:
    res = cli("demo", "--dir", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    assert "restore drill: PASS" in res.stdout
    assert "newest restorable checkpoint set: step-" in res.stdout
    # The restore it suggests gives back the primary's checkpoints, byte for byte.
    suggested = re.search(r"replicator (restore --repo \S+ --source checkpoints) \S+", res.stdout)
    assert suggested is not None
    dest = tmp_path / "restored"
    assert cli(*suggested.group(1).split(), str(dest)).returncode == 0
    primary = tree_digest(tmp_path / "demo" / "primary" / "checkpoints")
    assert primary and tree_digest(dest) == primary
