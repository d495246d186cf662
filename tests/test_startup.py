"""Start-up cost: what the common commands import.

A one-shot ``sync`` of a few files is mostly interpreter start-up and imports, so heavy
modules are imported only on the paths that need them (numpy for float tensors, structlog
for the first event that is logged, the S3 SDK for s3:// URLs, the daemon's watcher...).
These tests keep it that way: a module-level import added in the wrong place fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from replicator import __version__
from tests.conftest import write_config

NEVER_FOR_POSIX = {
    "numpy",  # only for float-grouped chunks and big read blocks
    "structlog",  # only once an event passes the log level
    "rich",  # only for progress bars on a terminal (and typer's --help)
    "aiobotocore",
    "botocore",
    "boto3",
    "aiohttp",
    "watchfiles",
    "replicator.verify.drill",
    "replicator.verify.formats",
    "replicator.daemon",
}


def imported(*args: str, cwd: Path | None = None) -> set[str]:
    """Run ``python -X importtime -m replicator ARGS``; return the names of the modules it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "replicator", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "REPLICATOR_CONFIG"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}


def test_help_loads_only_the_command_line() -> None:
    heavy = {"numpy", "pydantic", "structlog", "asyncio", "yaml", "prometheus_client", "replicator.config"}
    assert not imported("--help") & heavy


def test_posix_sync_restore_verify_skip_the_heavy_modules(tmp_path: Path) -> None:
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    repo.mkdir()
    for i in range(10):  # a dataset of small JSON records, as bench.data.small_files makes
        (src / f"rec-{i}.json").write_text(json.dumps({"id": i, "tokens": list(range(i, i + 300))}))
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "state_dir": str(tmp_path / "state"),
            "sources": [{"name": "src", "url": str(src)}],
            "targets": [{"name": "t", "url": str(repo)}],
        },
    )
    for args in (
        ("sync", "-q", "-c", str(cfg)),
        ("restore", "-q", "--repo", str(repo), "--source", "src", str(tmp_path / "out")),
        ("verify", "-q", "-c", str(cfg)),
    ):
        mods = imported(*args)
        heavy = {m for m in mods if m in NEVER_FOR_POSIX or m.partition(".")[0] in NEVER_FOR_POSIX}
        assert not heavy, args
        assert "yaml" not in mods or "-c" in args  # --repo needs no YAML parser
    assert (tmp_path / "out" / "rec-9.json").read_bytes() == (src / "rec-9.json").read_bytes()


def test_entry_point_tunes_the_garbage_collector() -> None:
    """The console script raises the young-generation threshold and freezes what start-up
    built (see replicator.__main__), and the command still runs and prints as usual."""
    probe = (
        "import gc, sys\n"
        "sys.argv = ['replicator', '--version']\n"
        "from replicator.__main__ import GC_YOUNG_THRESHOLD, main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, gc.get_freeze_count() > 1000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["replicator", __version__, "True", "True"]
