"""No traceback ever reaches a user (issue 22): every command against every failure class (a
missing config file, a broken one, an endpoint nobody listens on, credentials the server
refuses, Ctrl-C during a sync) ends with ONE error line on stderr (a JSON object with
--json) and the exit code README.md documents. In-process through typer's CliRunner; only the
SIGINT case needs a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from replicator.cli import app
from replicator.cli.support import EXIT_CODES
from replicator.config import ChunkingConfig, CompressionConfig
from replicator.globs import PathFilter
from replicator.hashing import HashSpec
from replicator.read.pipeline import ChunkConsumer, ChunkPipeline, EncodedChunk
from replicator.sources import PosixSource
from tests.conftest import write_config
from tests.helpers import config_dict, make_checkpoint
from tests.servers import RcloneServer, free_port

pytestmark = pytest.mark.usefixtures("restore_logging")

COMMANDS: dict[str, list[str]] = {
    "sync": ["sync"],
    "snapshots": ["snapshots"],
    "ls": ["ls", "-s", "d"],
    "diff": ["diff", "-s", "d", "latest", "latest"],
    "restore": ["restore", "-s", "d", "{dest}"],
    "verify": ["verify"],
    "plan": ["plan"],
    "status": ["status"],
    "forget": ["forget"],
    "prune": ["prune"],
    "stats": ["stats"],
    "parts": ["parts", "-s", "d"],
    "config check": ["config", "check", "--online"],
}
"""Every command that reads a config, with the arguments it needs besides -c."""

REPORTS = ("sync", "forget")
"""Commands that report a failed target in their result (stdout, per source and target), with
the exit code, rather than as an error line."""

NO_RETRY = {"initial": "10ms", "max": "20ms", "give_up_after": "200ms", "command_give_up_after": "200ms"}


def invoke(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, args, env={"REPLICATOR_CONFIG": None, **(env or {})})


def command_args(name: str, cfg: Path, tmp_path: Path, as_json: bool) -> list[str]:
    args = [a.replace("{dest}", str(tmp_path / "restored")) for a in COMMANDS[name]]
    return [*args, "-c", str(cfg), *(["--json"] if as_json else [])]


def assert_one_line_error(res: Result, code: int, as_json: bool, *, about: str = "") -> dict[str, Any] | str:
    """No traceback anywhere, the exit code, and exactly one error line, the last of stderr."""
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, output
    lines = res.stderr.splitlines()
    assert lines, "no error message"
    if as_json:
        errors = [line for line in lines if line.startswith('{"error"')]
        assert len(errors) == 1 and errors[0] == lines[-1], res.stderr
        doc = json.loads(errors[0])
        assert doc["exit_code"] == code and about in doc["error"], doc
        return dict(doc)
    errors = [line for line in lines if line.startswith("replicator: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], res.stderr
    assert about in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def primary(tmp_path: Path) -> Path:
    p = tmp_path / "primary"
    make_checkpoint(p, 1, hidden=16)
    return p


def s3_config(tmp_path: Path, primary: Path, target: dict[str, Any]) -> Path:
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"retry": NO_RETRY, **target}])
    return write_config(tmp_path / "r.yaml", data)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_config_file(command: str, as_json: bool, tmp_path: Path) -> None:
    res = invoke(command_args(command, tmp_path / "nowhere.yaml", tmp_path, as_json))
    if command == "config check":  # its report names the problem (on stdout)
        assert "Traceback" not in res.output and res.exit_code == 2 and "nowhere.yaml" in res.stdout
        return
    assert_one_line_error(res, 2, as_json, about="nowhere.yaml")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("broken", ["yaml", "field"])
def test_a_broken_config_file(
    command: str, as_json: bool, broken: str, tmp_path: Path, primary: Path
) -> None:
    cfg = tmp_path / "r.yaml"
    if broken == "yaml":
        cfg.write_text("sources: [\n  - name: d\n")
    else:
        data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": "/x"}])
        data["sources"][0]["keep_lats"] = 3  # misspelt
        write_config(cfg, data)
    res = invoke(command_args(command, cfg, tmp_path, as_json))
    if command == "config check":  # lists every problem, one line each, then its verdict
        assert "Traceback" not in res.stdout + res.stderr and res.exit_code == 2
        return
    assert_one_line_error(res, 2, as_json)


UNREACHABLE_EXIT = {"status": 0, "config check": 3}
"""An unreachable target: exit 3, except for status: it reports the target's error in its row,
and exits 1 only once an RPO is breached (this config sets none)."""


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unreachable_endpoint(command: str, as_json: bool, tmp_path: Path, primary: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = s3_config(tmp_path, primary, {"name": "t", "url": "s3://bkt/r", "endpoint_url": closed})
    res = invoke(command_args(command, cfg, tmp_path, as_json))
    code = UNREACHABLE_EXIT.get(command, 3)
    if command in ("status", "config check"):  # a report, not an error: it names the target
        assert "Traceback" not in res.stdout + res.stderr and res.exit_code == code, res.output
        assert "connect" in res.stdout, res.stdout
        return
    if command in REPORTS:  # a report per source; the unreachable target is named
        assert "Traceback" not in res.stdout + res.stderr and res.exit_code == code, res.output
        return
    assert_one_line_error(res, code, as_json)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_credentials_the_server_refuses(
    command: str, tmp_path: Path, primary: Path, rclone: RcloneServer
) -> None:
    bucket = rclone.new_bucket()
    target = {
        "name": "t",
        "url": f"s3://{bucket}/r",
        "endpoint_url": rclone.endpoint,
        "access_key_id": "${BAD_KEY}",
        "secret_access_key": "${BAD_SECRET}",
    }
    cfg = s3_config(tmp_path, primary, target)
    bad = {"BAD_KEY": "WRONGKEY0000", "BAD_SECRET": "wrong-secret-0000"}
    res = invoke(command_args(command, cfg, tmp_path, False), env=dict(bad))
    output = res.stdout + res.stderr
    assert "Traceback" not in output and "wrong-secret-0000" not in output, output
    assert "InvalidAccessKeyId" in output or "denied" in output.lower(), output
    if command == "status":  # the refusal is the target's last error, in its row
        assert res.exit_code == UNREACHABLE_EXIT["status"], output
        return
    assert res.exit_code in (1, 3), output
    if command not in (*REPORTS, "status", "config check"):
        assert_one_line_error(res, res.exit_code, False)


def test_every_exit_code_is_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    for code in EXIT_CODES:
        assert f"| {code} |" in section, f"exit code {code} is not in README's table"


def test_usage_errors_are_one_line_and_json_with_json() -> None:
    res = invoke(["sync", "--bogus"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("replicator: error: No such option: --bogus") and "╭" not in res.stderr
    res = invoke(["snapshots", "--json", "--bogus"])
    assert res.exit_code == 2 and json.loads(res.stderr)["exit_code"] == 2
    res = invoke(["ls", "-c", "x.yaml"])  # a required option missing
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--source" in res.stderr


def sync_process(tmp_path: Path, primary: Path, name: str) -> tuple[subprocess.Popen[str], Path]:
    """``replicator sync`` of ``primary`` to a fresh target, as a process; and that target."""
    target = tmp_path / f"target-{name}"
    target.mkdir()
    data = config_dict(
        tmp_path / name, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": str(target)}]
    )
    cfg = write_config(tmp_path / f"{name}.yaml", data)
    env = {k: v for k, v in os.environ.items() if k != "REPLICATOR_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator", "sync", "-q", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, target


def test_sigint_during_sync_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C while the command starts, and while a sync reads through its thread pools (once
    the first chunks reached the target): exit 130 and one line; never a traceback (it was
    "cannot schedule new futures after shutdown", or a KeyboardInterrupt inside an import)."""
    primary = tmp_path / "primary"
    for i in range(6):
        make_checkpoint(primary / f"run-{i}", 1, hidden=512, shards=4)
    mid_work = 0
    for round_ in range(4):
        proc, target = sync_process(tmp_path, primary, f"r{round_}")
        if round_:  # round 0: at once, while Python imports and parses
            deadline = time.monotonic() + 120
            while proc.poll() is None and not any(p.is_file() for p in target.glob("*/*/*")):
                assert time.monotonic() < deadline, "the sync never started writing"
                time.sleep(0.005)
            mid_work += proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in out + err and "cannot schedule" not in err, err
        if proc.returncode == 130:
            assert err.splitlines() == ["replicator: error: interrupted"], err
        elif round_ == 0 and proc.returncode == -signal.SIGINT:  # before Python set up its handler
            assert not out and not err  # the shell shows 130 too
        else:  # the signal came after the work: done, or killed as the interpreter exited
            assert proc.returncode in (0, -signal.SIGINT) and "published" in out, (proc.returncode, err)
    assert mid_work, "no round was interrupted while the sync was working"


def test_a_read_in_flight_when_the_pipeline_closes_is_cancelled_not_crashed(tmp_path: Path) -> None:
    """What a Ctrl-C does to a sync, deterministically: the engine closes the pipeline (its
    thread pools shut down) while a file is still being read. The read ends cancelled, which
    asyncio.run discards quietly, not with RuntimeError("cannot schedule new futures after
    shutdown"), which reached the user as a traceback."""
    (tmp_path / "big.bin").write_bytes(os.urandom(4 << 20))
    source = PosixSource("d", tmp_path, PathFilter())
    chunking = ChunkingConfig(min_size=64 << 10, avg_size=128 << 10, max_size=256 << 10)
    pipe = ChunkPipeline(chunking, CompressionConfig(), [HashSpec("xxh3-128", 1)])

    class ClosesThePipeline(ChunkConsumer):
        taken = 0

        def wants(self, ids: dict[str, str]) -> bool:
            return True

        async def take(self, chunk: EncodedChunk) -> None:
            self.taken += 1
            pipe.close()  # as the engine's exit stack does, mid-file

    async def go() -> asyncio.Task[object]:
        (file,) = (await source.scan()).files
        task: asyncio.Task[object] = asyncio.ensure_future(pipe.read_file(source, file, ClosesThePipeline()))
        await asyncio.wait([task])
        return task

    task = asyncio.run(go())
    assert task.cancelled(), task.exception()


def test_sync_with_no_target_open_does_not_report_an_empty_source(tmp_path: Path, primary: Path) -> None:
    """With every target unreachable, ``sync`` never scans the source: its line must say so,
    not "0 files, 0 B" (an operator reading that would think the primary is empty)."""
    closed = f"http://127.0.0.1:{free_port()}"
    cfg = s3_config(tmp_path, primary, {"name": "t", "url": "s3://bkt/r", "endpoint_url": closed})
    res = invoke(["sync", "-c", str(cfg)])
    assert res.exit_code == 3, res.output
    first = res.stdout.splitlines()[0]
    assert first.startswith("d: not scanned: no target could be opened"), res.stdout
    assert "0 files" not in res.stdout
    as_json = invoke(["sync", "-c", str(cfg), "--json"])
    assert json.loads(as_json.stdout)["sources"][0]["scanned"] is False, as_json.stdout
