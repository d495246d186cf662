"""The habits restic and rclone users bring (issue 22): -v/-vv/-q and --log-format on every
command, REPLICATOR_* environment variables, shell completion, JSON log lines with JSON values,
IEC units, plurals and small amounts of money; and the demo run twice publishes nothing new."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from replicator import log
from replicator.cli import app
from replicator.demo import create_demo
from replicator.progress import speed_text
from replicator.units import format_usd, plural
from replicator.verify.formats import check_file
from tests.helpers import local_setup, make_checkpoint

pytestmark = pytest.mark.usefixtures("restore_logging")

CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    (
        "REPLICATOR_CONFIG",
        "REPLICATOR_REPO",
        "REPLICATOR_SOURCE",
        "REPLICATOR_TARGET",
        "REPLICATOR_LOG_LEVEL",
        "REPLICATOR_LOG_FORMAT",
    )
)


def invoke(*args: str | Path, env: Mapping[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={**CLEAN_ENV, **(env or {})})


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[Path, Path]:
    """(target, config): one small checkpoint replicated as source ``d`` to target ``t``."""
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=32)
    assert invoke("sync", "-q", "-c", cfg).exit_code == 0
    return target, cfg


def root_handler_is_json() -> bool:
    formatter = logging.getLogger().handlers[0].formatter
    return bool(getattr(formatter, "json_output", None))


@pytest.mark.parametrize(
    ("flags", "level"),
    [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG), (["-q"], logging.ERROR)],
)
@pytest.mark.parametrize("command", ["snapshots", "ls", "verify", "stats"])
def test_verbose_and_quiet_on_every_command(
    replicated: tuple[Path, Path], command: str, flags: list[str], level: int
) -> None:
    target, _ = replicated
    extra = ["-s", "d"] if command == "ls" else []
    res = invoke(command, "--repo", target, *extra, *flags)
    assert res.exit_code == 0, res.output
    assert logging.getLogger().level == level


def test_every_command_takes_the_logging_options() -> None:
    commands = "sync run release forget prune stats parts plan status snapshots restore ls diff verify demo"
    for command in commands.split():
        text = invoke(command, "-h", env={"COLUMNS": "200"}).stdout
        for option in ("--verbose", "--quiet", "--log-format", "--log-level"):
            assert re.search(rf"\s{option}\s", text), f"{command} lacks {option}"
    assert "--log-format" in invoke("config", "check", "-h", env={"COLUMNS": "200"}).stdout


def test_log_format_and_level_from_flags_and_environment(replicated: tuple[Path, Path]) -> None:
    target, _ = replicated
    assert invoke("snapshots", "--repo", target, "--log-format", "json").exit_code == 0
    assert root_handler_is_json()
    env: dict[str, str | None] = {"REPLICATOR_LOG_FORMAT": "text", "REPLICATOR_LOG_LEVEL": "debug"}
    assert invoke("snapshots", "--repo", target, env=env).exit_code == 0
    assert not root_handler_is_json() and logging.getLogger().level == logging.DEBUG
    # -v wins over the variable, a typo is a one-line usage error
    assert invoke("snapshots", "--repo", target, "-v", env=env).exit_code == 0
    assert logging.getLogger().level == logging.INFO
    bad = invoke("snapshots", "--repo", target, "--log-format", "xml")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "text or json" in bad.stderr
    both = invoke("snapshots", "--repo", target, "-v", "-q")
    assert both.exit_code == 2 and "not both" in both.stderr


def test_repository_source_and_target_from_the_environment(replicated: tuple[Path, Path]) -> None:
    target, cfg = replicated
    by_env = invoke("snapshots", "--json", env={"REPLICATOR_REPO": str(target)})
    assert by_env.exit_code == 0, by_env.output
    [row] = json.loads(by_env.stdout)
    assert row["source"] == "d"
    ls = invoke("ls", "--json", env={"REPLICATOR_REPO": str(target), "REPLICATOR_SOURCE": "d"})
    assert ls.exit_code == 0 and json.loads(ls.stdout)["source"] == "d", ls.output
    # what is typed wins: -c with -t opens the config's target, not REPLICATOR_REPO's
    elsewhere = {"REPLICATOR_REPO": str(cfg.parent / "no-such-repo")}
    typed = invoke("snapshots", "-c", cfg, "-t", "t", "--json", env=elsewhere)
    assert typed.exit_code == 0 and json.loads(typed.stdout) == [row], typed.output
    only_env = invoke("snapshots", "--json", env=elsewhere)
    assert only_env.exit_code != 0 and "no-such-repo" in only_env.stderr
    config_env = invoke("snapshots", "--json", env={"REPLICATOR_CONFIG": str(cfg), "REPLICATOR_TARGET": "t"})
    assert config_env.exit_code == 0 and json.loads(config_env.stdout) == [row]


def test_shell_completion() -> None:
    res = invoke("--show-completion", "bash")
    assert res.exit_code == 0 and "_REPLICATOR_COMPLETE" in res.stdout, res.output
    assert "--install-completion" in invoke("--help", env={"COLUMNS": "200"}).stdout


def test_json_log_lines_carry_json_values_and_no_secrets() -> None:
    stream = io.StringIO()
    log.configure("info", json_output=True, stream=stream)
    log.REDACTOR.add(["hunter2-secret-value"])
    log.get_logger("t").info(
        "sync.done",
        sources=["checkpoints", "dataset"],
        sizes={"checkpoints": 1024, "dataset": 2.5},
        files=3,
        target=None,
        headers={"Authorization": "AWS4 Credential=AKIA/...", "note": "key hunter2-secret-value"},
        names=("line\nbreak",),
    )
    [line] = stream.getvalue().splitlines()  # one line per event
    event = json.loads(line)
    assert event["sources"] == ["checkpoints", "dataset"]
    assert event["sizes"] == {"checkpoints": 1024, "dataset": 2.5} and event["files"] == 3
    assert event["target"] is None and event["names"] == ["line\nbreak"]
    assert event["headers"] == {"Authorization": "***", "note": "key ***"}
    assert "hunter2" not in line and "AKIA" not in line

    text = io.StringIO()
    log.configure("info", json_output=False, stream=text)
    log.get_logger("t").info("sync.done", sources=["a\nb"])
    assert len(text.getvalue().splitlines()) == 1


def test_units_plurals_and_money() -> None:
    assert speed_text(3 * 1024 * 1024) == "3.00 MiB/s" and speed_text(None) == "?"
    assert [plural(1, "source"), plural(2, "source"), plural(0, "PROBLEM")] == [
        "1 source",
        "2 sources",
        "0 PROBLEMS",
    ]
    assert [format_usd(x) for x in (0, 0.0036, 0.01, 12.345, 0.000012345)] == [
        "$0.00",
        "$0.0036",
        "$0.01",
        "$12.35",
        "$0.000012",
    ]


def test_one_source_is_singular(replicated: tuple[Path, Path]) -> None:
    _, cfg = replicated
    res = invoke("verify", "-c", cfg)
    assert res.exit_code == 0 and ": OK: 1 source, 1 snapshot, " in res.stdout, res.stdout


def test_an_empty_dcp_metadata_file_says_it_is_empty(tmp_path: Path) -> None:
    marker = tmp_path / ".metadata"
    marker.touch()
    with open(marker, "rb") as f:
        result = check_file(f, "step-1/.metadata", {"step-1/.metadata": 0})
    assert result is not None and result.problem is not None
    assert ".metadata is empty (0 bytes)" in result.problem and "pickle" not in result.problem


def test_the_demo_twice_publishes_nothing_new(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    cfg = create_demo(root, steps=1, hidden=64)
    first = invoke("sync", "-q", "-c", cfg)
    assert first.exit_code == 0 and "published" in first.stdout, first.output
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "primary" in p.parts}
    assert create_demo(root, steps=1, hidden=64) == cfg
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    again = invoke("sync", "-q", "-c", cfg)
    assert again.exit_code == 0 and "published" not in again.stdout and "unchanged" in again.stdout, (
        again.stdout
    )
