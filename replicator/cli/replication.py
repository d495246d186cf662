"""Commands that replicate: ``sync`` (one pass), ``run`` (the daemon), ``release``, ``plan``,
``status`` and ``demo``.

Thin, like every command (:mod:`replicator.cli`): parse, call one library function, render."""

from __future__ import annotations

from pathlib import Path

import typer

from replicator.cli import options as opt
from replicator.cli import render
from replicator.cli.app import app
from replicator.cli.support import (
    EXIT_SEVERITY,
    check_selection,
    emit,
    fail,
    load,
    run_coroutine,
)
from replicator.errors import ConfigError, ReplicatorError
from replicator.progress import make_progress


@app.command()
def sync(
    config_path: opt.ConfigPath = None,
    source: opt.Sources = None,
    target: opt.Targets = None,
    allow_deletes: opt.AllowDeletes = False,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    log_level: opt.LogLevel = None,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """One replication pass: every source (or --source) to every target (or --target).

    Unchanged files are not read again; chunks a target already holds are not sent again.
    A checkpoint set is published only when complete, and a published set is never replaced
    by a partial version of itself. Exit codes: 0 done; 4 published, but some files could not
    be read (what an earlier snapshot holds of them is carried forward; they are listed);
    3 a target could not be reached; 1 a target failed, or a mass deletion was held."""
    from replicator.sync import run_sync

    config = load(config_path, log_level)
    check_selection(config, source, target)
    progress = make_progress(quiet or as_json)
    results, target_errors = run_coroutine(
        lambda: run_sync(
            config, sources=source, targets=target, progress=progress, allow_deletes=allow_deletes
        )
    )
    errors = {k: str(v) for k, v in target_errors.items()}
    emit(as_json, {"sources": results, "target_errors": errors}, lambda: render.sync_lines(results))
    code = max((r.exit_code for r in results), key=EXIT_SEVERITY.index, default=0)
    if code:
        raise typer.Exit(code)


@app.command()
def run(
    config_path: opt.ConfigPath = None,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Run the replication daemon: watch every source and keep every target up to date.

    Meant for a systemd service (Type=notify; see systemd/) or a Kubernetes sidecar. Changes
    are picked up from filesystem events (or polling), a checkpoint set is published once
    complete, and each target is served independently: a slow or dead target never holds up
    the others and catches up when it returns. SIGTERM/SIGINT drain in-flight work for up to
    `shutdown_grace`, then exit 0."""
    from replicator.daemon import run_daemon
    from replicator.s3.settings import check_profiles

    config = load(config_path, log_level, default_level="info")
    check_selection(config)
    try:
        check_profiles(config)  # the daemon would retry a missing AWS profile forever
    except ConfigError as exc:
        fail(str(exc), 2)
    assert config_path is not None
    run_coroutine(lambda: run_daemon(config, config_path))


@app.command()
def release(
    source: opt.ReleaseSource,
    config_path: opt.ConfigPath = None,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Release a publish the running daemon holds because it would delete too much.

    When a pass would drop more than a source's `max_delete` share of the latest snapshot
    (a wiped or half-deleted primary looks exactly like that), the daemon keeps the replica
    as it is, alerts, and shows HELD in `replicator status`. Check the primary; if the
    deletions are intended, this tells the daemon (by a note in state_dir and SIGHUP) to
    publish them once on every target. Without a daemon, use `sync --allow-deletes`."""
    from replicator.release import request

    config = load(config_path, log_level)
    check_selection(config, [source], complete=False)
    try:
        pid = request(config.state_dir, source)
    except ReplicatorError as exc:
        fail(str(exc), exc.exit_code)
    typer.echo(f"released {source}: the daemon (pid {pid}) publishes it now; see `replicator status`")


@app.command()
def plan(
    config_path: opt.ConfigPath = None,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    log_level: opt.LogLevel = None,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Dry run: what the next `sync` would send to each target and what it would cost.

    Scans the sources, reads and encodes what changed (as sync would, nothing is uploaded or
    written), compares with what each target already holds, and prints bytes, requests,
    estimated cost per target and source (from each target's `cost` prices), the time under
    `max_bandwidth`, and what each budget has left today."""
    from replicator.plan import make_plan

    config = load(config_path, log_level)
    check_selection(config)
    result = run_coroutine(lambda: make_plan(config, make_progress(quiet or as_json)))
    emit(as_json, result, lambda: render.plan_lines(result))


@app.command()
def status(
    config_path: opt.ConfigPath = None,
    as_json: opt.Json = False,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Where every source x target stands: last snapshot, lag against the RPO, pending work,
    last error.

    Asks the running daemon (at `listen`); with none running, reads the state store and the
    targets and scans the sources. Exits 0 when everything is within its RPO and 1 when
    anything is breached, so it can gate cron jobs and scripts."""
    from replicator.status import gather_status
    from replicator.status import render as status_text

    config = load(config_path, log_level)
    report = run_coroutine(lambda: gather_status(config))
    emit(as_json, report.to_json(), lambda: [status_text(report)])
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def demo(
    directory: opt.DemoDir = Path("replicator-demo"),
    quiet: opt.Quiet = False,
    log_level: opt.LogLevel = None,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Replicate demo checkpoint data to a local target: no cloud account needed.

    Creates bf16 safetensors checkpoint sets and a JSONL dataset under DIR/primary, a config
    at DIR/replicator.yaml, runs `sync` to DIR/secondary, then `verify --read-data` and a
    restore drill (`verify --restore-drill`)."""
    from replicator.demo import create_demo

    directory = directory.resolve()
    cfg_path = create_demo(directory)
    typer.echo(f"demo data and config written under {directory}")
    for command, *flags in (["sync"], ["verify", "--read-data"], ["verify", "--restore-drill"]):
        typer.echo(" ".join(["$ replicator", command, "--config", str(cfg_path), *flags]))
        passed = [*(["--quiet"] if quiet else []), *(["-v"] * verbose)]
        passed += ["--log-format", log_format] if log_format else []
        passed += ["--log-level", log_level] if log_level else []
        _invoke([command, "--config", str(cfg_path), *flags, *passed])
    typer.echo(
        "\nNext: list snapshots with\n"
        f"  replicator snapshots --repo {directory / 'secondary'}\n"
        "and restore the newest checkpoint anywhere, without the config, with\n"
        f"  replicator restore --repo {directory / 'secondary'} --source checkpoints /tmp/restored"
    )


def _invoke(args: list[str]) -> None:
    try:
        app(opt.optional_values(args), standalone_mode=False)
    except typer.Exit as exc:
        if exc.exit_code:
            raise
