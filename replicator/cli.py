"""The ``replicator`` command line. Commands are thin: parse options, call the library, print.

Exit codes (all commands): 0 success; 1 the operation failed or found problems; 2 usage or
configuration error; 3 a target could not be reached; 4 (sync) published, but some files could
not be read; 130 interrupted. Errors are one line on stderr.

Start-up time counts (a one-shot ``sync`` of a few files is mostly interpreter start-up), so
this module imports only typer and light helpers; each command imports the library modules it
uses when it runs. ``replicator --help`` then never loads pydantic, numpy, structlog or
asyncio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from replicator import __version__
from replicator.errors import ConfigError, ReplicatorError
from replicator.paths import display_path, one_line
from replicator.progress import make_progress
from replicator.units import format_duration, format_size

if TYPE_CHECKING:
    from replicator.config import Config, TargetConfig

T = TypeVar("T")

app = typer.Typer(
    name="replicator",
    help="Keep ML training state portable: replicate checkpoints, datasets and embeddings to "
    "secondary S3-compatible or POSIX targets, deduplicated and verifiable.\n\n"
    "Start with `replicator demo`, then see `replicator COMMAND --help`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- shared options ---------------------------------------------------------------------------

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="REPLICATOR_CONFIG", help="YAML config file.", show_default=False),
]
RepoOpt = Annotated[
    str | None,
    typer.Option(
        "--repo",
        help="Open a repository directly by URL (a directory or s3://bucket/prefix), without a "
        "config file: what a disaster-recovery site has.",
        show_default=False,
    ),
]
TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="Target name from the config.")]
EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint-url", help="S3 endpoint for --repo (default: AWS).")
]
RegionOpt = Annotated[str | None, typer.Option("--region", help="S3 region for --repo.")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="AWS profile for --repo.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
GiveUpOpt = Annotated[
    str | None,
    typer.Option(
        "--give-up-after",
        metavar="DURATION",
        help="Stop retrying a target that does not answer after this long, and exit 3 "
        "(default: the target's retry.command_give_up_after, 30s).",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", help="debug, info, warning or error (default: from config, else warning)."),
]


EXIT_SEVERITY = [0, 4, 3, 1]
"""Exit codes of a pass from least to most severe: the worst outcome wins."""


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"replicator: error: {message}", err=True)
    raise typer.Exit(code)


def run_coroutine(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning library errors into a one-line message and exit code."""
    import asyncio

    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except ReplicatorError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def setup_logging(level: str | None, config: Config | None = None, default: str = "warning") -> None:
    """--log-level, else the config's log_level, else the command's default (one-shot commands
    stay quiet; the daemon logs at info)."""
    from replicator import log

    chosen = level or (config.log_level if config else None) or default
    if chosen not in ("debug", "info", "warning", "error"):
        fail(f"--log-level must be debug, info, warning or error (got {chosen!r})", 2)
    log.configure(chosen)
    if config is not None:
        log.REDACTOR.add(config.secret_values())


def load(config_path: Path | None, log_level: str | None, default_level: str = "warning") -> Config:
    from replicator.config import load_config

    if config_path is None:
        fail("--config is required (or set REPLICATOR_CONFIG)", 2)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    setup_logging(log_level, config, default_level)
    return config


def repo_target_config(
    config_path: Path | None,
    target: str | None,
    repo: str | None,
    endpoint: str | None,
    region: str | None,
    profile: str | None,
    log_level: str | None,
    give_up_after: str | None = None,
) -> tuple[TargetConfig, Config | None]:
    """Resolve ``--config/--target`` or ``--repo`` into one target's settings."""
    from replicator.config import TargetConfig

    if repo is not None:
        if config_path is not None and target is not None:
            fail("give either --repo or --config with --target, not both", 2)
        setup_logging(log_level)
        url = repo if "://" in repo else str(Path(repo).resolve())
        try:
            cfg = TargetConfig(name="repo", url=url, endpoint_url=endpoint, region=region, profile=profile)
        except ValueError as exc:
            fail(f"--repo: {exc}", 2)
        return with_give_up(cfg, give_up_after), None
    config = load(config_path, log_level)
    if target is None:
        if len(config.targets) != 1:
            fail("--target is required when the config has several targets (or use --repo)", 2)
        return with_give_up(config.targets[0], give_up_after), config
    try:
        return with_give_up(config.target(target), give_up_after), config
    except ConfigError as exc:
        fail(str(exc), 2)


def with_give_up(cfg: TargetConfig, give_up_after: str | None) -> TargetConfig:
    """``cfg`` with ``--give-up-after`` as its one-shot retry limit, if given."""
    if give_up_after is None:
        return cfg
    from replicator.units import parse_duration

    try:
        seconds = parse_duration(give_up_after)
    except ValueError as exc:
        fail(f"--give-up-after: {exc}", 2)
    return cfg.model_copy(update={"retry": cfg.retry.model_copy(update={"command_give_up_after": seconds})})


def emit_json(data: Any) -> None:
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)

    typer.echo(json.dumps(data, default=default, indent=2))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


# -- commands ---------------------------------------------------------------------------------


@app.command()
def sync(
    config_path: ConfigOpt = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", "-s", help="Only this source (repeatable).")
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Only this target (repeatable).")
    ] = None,
    allow_deletes: Annotated[
        bool,
        typer.Option(
            "--allow-deletes",
            help="Publish even if it drops more than the source's `max_delete` share of the "
            "latest snapshot (check the primary first: this is how a wiped primary would look).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """One replication pass: every source (or --source) to every target (or --target).

    Unchanged files are not read again; chunks a target already holds are not sent again.
    A checkpoint set is published only when complete, and a published set is never replaced
    by a partial version of itself. Exit codes: 0 done; 4 published, but some files could not
    be read (what an earlier snapshot holds of them is carried forward; they are listed);
    3 a target could not be reached; 1 a target failed, or a mass deletion was held."""
    from replicator.sync import run_sync

    config = load(config_path, log_level)
    if not config.sources or not config.targets:
        fail("the config needs at least one source and one target", 2)
    try:
        for n in source or []:
            config.source(n)
        for n in target or []:
            config.target(n)
    except ConfigError as exc:
        fail(str(exc), 2)
    results, target_errors = run_coroutine(
        lambda: run_sync(
            config,
            sources=source,
            targets=target,
            progress=make_progress(quiet or as_json),
            allow_deletes=allow_deletes,
        )
    )
    if as_json:
        emit_json({"sources": results, "target_errors": {k: str(v) for k, v in target_errors.items()}})
    else:
        for r in results:
            line = (
                f"{r.source}: {r.files} files, {format_size(r.bytes_total)}; read {r.files_read} files, "
                f"{format_size(r.bytes_read)} in {format_duration(r.seconds)}"
            )
            if r.seconds and r.bytes_read:
                line += f" ({format_size(r.bytes_read / r.seconds)}/s)"
            typer.echo(line)
            for name, why in sorted(r.held_back.items()):
                typer.echo(f"  held back {display_path(name)}: {one_line(why)}")
            for path, why in sorted(r.skipped.items()):
                typer.echo(f"  unreadable {display_path(path)}: {one_line(why)}")
            for path, why in sorted(r.ignored.items()):
                typer.echo(f"  not replicated {display_path(path)}: {one_line(why)}")
            for t in r.targets:
                u = t.uploads
                for name, why in sorted(t.damaged.items()):
                    typer.echo(
                        f"  -> {t.target}: DAMAGED on the primary: {display_path(name)}: {one_line(why)}; "
                        "its last complete version stays published"
                    )
                for name, why in sorted(t.carried.items()):
                    if name not in t.damaged:
                        shown = f"{display_path(name)} ({one_line(why)})"
                        typer.echo(f"  -> {t.target}: kept from the previous snapshot: {shown}")
                if t.status == "failed":
                    typer.echo(f"  -> {t.target}: FAILED: {t.error}")
                    continue
                if t.status == "held":
                    typer.echo(
                        f"  -> {t.target}: HELD: {t.error}; nothing published. Check the primary, then "
                        "run again with --allow-deletes (or raise max_delete)"
                    )
                    continue
                if t.status == "deferred":
                    typer.echo(f"  -> {t.target}: DEFERRED: {t.error}; it resumes when the budget allows")
                    continue
                if t.status == "empty":
                    typer.echo(f"  -> {t.target}: nothing to publish (no complete files); nothing written")
                    continue
                typer.echo(
                    f"  -> {t.target}: {t.status} {t.snapshot}; new {format_size(u.bytes_new)}, "
                    f"sent {format_size(u.bytes_sent)}, dedup {ratio(r.bytes_read, u.bytes_new)}, "
                    f"compression {ratio(u.bytes_new, u.bytes_sent)}"
                )
    code = max((r.exit_code for r in results), key=EXIT_SEVERITY.index, default=0)
    if code:
        raise typer.Exit(code)


@app.command()
def run(
    config_path: ConfigOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Run the replication daemon: watch every source and keep every target up to date.

    Meant for a systemd service (Type=notify; see systemd/) or a Kubernetes sidecar. Changes
    are picked up from filesystem events (or polling), a checkpoint set is published once
    complete, and each target is served independently: a slow or dead target never holds up
    the others and catches up when it returns. SIGTERM/SIGINT drain in-flight work for up to
    `shutdown_grace`, then exit 0."""
    from replicator.daemon import run_daemon

    config = load(config_path, log_level, default_level="info")
    if not config.sources or not config.targets:
        fail("the config needs at least one source and one target", 2)
    assert config_path is not None
    run_coroutine(lambda: run_daemon(config, config_path))


@app.command()
def release(
    source: Annotated[str, typer.Option("--source", "-s", help="The source whose held publish to release.")],
    config_path: ConfigOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Release a publish the running daemon holds because it would delete too much.

    When a pass would drop more than a source's `max_delete` share of the latest snapshot
    (a wiped or half-deleted primary looks exactly like that), the daemon keeps the replica
    as it is, alerts, and shows HELD in `replicator status`. Check the primary; if the
    deletions are intended, this tells the daemon (by a note in state_dir and SIGHUP) to
    publish them once on every target. Without a daemon, use `sync --allow-deletes`."""
    from replicator.release import request

    config = load(config_path, log_level)
    try:
        config.source(source)
    except ConfigError as exc:
        fail(str(exc), 2)
    try:
        pid = request(config.state_dir, source)
    except ReplicatorError as exc:
        fail(str(exc), exc.exit_code)
    typer.echo(f"released {source}: the daemon (pid {pid}) publishes it now; see `replicator status`")


@app.command()
def forget(
    config_path: ConfigOpt = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", "-s", help="Only this source (repeatable).")
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Only this target (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Say what would be deleted; delete nothing.")
    ] = False,
    give_up_after: GiveUpOpt = None,
    as_json: JsonOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Apply each source's retention policy on each target now: list what is kept (and why) and
    what is dropped, and delete the dropped snapshot manifests.

    The daemon and `sync` already apply the policy after each publish; this applies a changed
    policy at once, or shows what a policy keeps (`--dry-run`). Only snapshot manifests are
    deleted, never chunks, never the latest, never the last snapshot holding a checkpoint set
    the policy keeps, never a manifest that cannot be read. Exit codes: 0 done; 1 a source
    failed on some target (what was deleted is listed); 3 a target could not be reached."""
    from replicator.retention.apply import forget as forget_policy
    from replicator.retention.apply import forget_lines

    config = load(config_path, log_level)
    try:
        for name in source or []:
            config.source(name)
        for name in target or []:
            config.target(name)
    except ConfigError as exc:
        fail(str(exc), 2)
    if give_up_after is not None:
        targets = [with_give_up(t, give_up_after) for t in config.targets]
        config = config.model_copy(update={"targets": targets})
    report = run_coroutine(lambda: forget_policy(config, sources=source, targets=target, dry_run=dry_run))
    if as_json:
        emit_json(report.to_json())
    else:
        for line in forget_lines(report):
            typer.echo(line)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command()
def plan(
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Dry run: what the next `sync` would send to each target and what it would cost.

    Scans the sources, reads and encodes what changed (as sync would, nothing is uploaded or
    written), compares with what each target already holds, and prints bytes, requests,
    estimated cost per target and source (from each target's `cost` prices), the time under
    `max_bandwidth`, and what each budget has left today."""
    from replicator.plan import make_plan

    config = load(config_path, log_level)
    if not config.sources or not config.targets:
        fail("the config needs at least one source and one target", 2)
    result = run_coroutine(lambda: make_plan(config, make_progress(quiet or as_json)))
    if as_json:
        emit_json(result)
        return
    typer.echo(
        f"scanned {result.files} files ({format_size(result.bytes_scanned)}); read {result.files_read} "
        f"changed files ({format_size(result.bytes_read)}) in {format_duration(result.seconds)}"
    )
    for t in result.targets:
        when = (
            f", {format_duration(t.seconds_at_cap)} at max_bandwidth" if t.seconds_at_cap is not None else ""
        )
        new = "" if t.exists else " (new repository)"
        typer.echo(
            f"-> {t.target}{new}: send {format_size(t.bytes)} in {t.chunks} chunks, {t.puts} PUT/LIST + "
            f"{t.gets} GET requests, ${t.cost_usd:.4f} (egress ${t.egress_usd:.4f}, requests "
            f"${t.requests_usd:.4f}){when}"
        )
        if t.storage_usd_per_month is not None:
            typer.echo(f"   adds ${t.storage_usd_per_month:.4f}/month of storage")
        for s in t.sources:
            verdict = "" if s.budget_allows else "  DEFERRED by budget"
            size = format_size(s.bytes)
            typer.echo(f"   {s.source} ({s.priority}): {size}, {s.puts} PUTs, ${s.cost_usd:.4f}{verdict}")
    for b in result.budgets:
        spent, allowed = b.spent_today_usd, b.allowance_today_usd
        typer.echo(f"budget {b.scope} ({b.mode}): today ${spent:.4f} spent of ${allowed:.4f}")
    for path, why in sorted(result.skipped.items()):
        typer.echo(f"  skipped {display_path(path)}: {one_line(why)}")


@app.command()
def status(
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Where every source x target stands: last snapshot, lag against the RPO, pending work,
    last error.

    Asks the running daemon (at `listen`); with none running, reads the state store and the
    targets and scans the sources. Exits 0 when everything is within its RPO and 1 when
    anything is breached, so it can gate cron jobs and scripts."""
    from replicator.status import gather_status, render

    config = load(config_path, log_level)
    report = run_coroutine(lambda: gather_status(config))
    if as_json:
        emit_json(report.to_json())
    else:
        typer.echo(render(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def snapshots(
    config_path: ConfigOpt = None,
    target: TargetOpt = None,
    repo: RepoOpt = None,
    source: Annotated[str | None, typer.Option("--source", "-s", help="Only this source.")] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    give_up_after: GiveUpOpt = None,
    as_json: JsonOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """List the snapshots in a target's repository, oldest first (`*` marks the latest)."""
    from replicator.repository import Repository
    from replicator.targets import open_target

    tcfg, _ = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )

    async def go() -> list[dict[str, Any]]:
        t = await open_target(tcfg)
        try:
            r = await Repository.open(t)
            rows = []
            for name in [source] if source else await r.list_sources():
                latest = await r.latest(name)
                for sid in await r.list_snapshots(name):
                    m = await r.load_manifest(name, sid)
                    rows.append(
                        {
                            "source": name,
                            "snapshot": sid,
                            "created": m.created,
                            "kind": m.kind,
                            "files": len(m.files),
                            "bytes": m.total_bytes,
                            "latest": sid == latest,
                            "sets": [s.name for s in m.sets],
                        }
                    )
            return rows
        finally:
            await t.close()

    rows = run_coroutine(go)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no snapshots")
        return
    for row in rows:
        mark = "*" if row["latest"] else " "
        sets = f"  sets: {', '.join(map(display_path, row['sets']))}" if row["sets"] else ""
        typer.echo(
            f"{mark} {row['source']:<16} {row['snapshot']}  {row['files']:>6} files "
            f"{format_size(row['bytes']):>11}{sets}"
        )


@app.command()
def restore(
    dest: Annotated[
        str,
        typer.Argument(
            help="Destination directory (created if needed), or s3://bucket/prefix to restore each "
            "file as a plain object a training job can read directly.",
            metavar="DEST",
            show_default=False,
        ),
    ],
    source: Annotated[str, typer.Option("--source", "-s", help="Source whose snapshot to restore.")],
    config_path: ConfigOpt = None,
    target: TargetOpt = None,
    repo: RepoOpt = None,
    snapshot: Annotated[
        str | None,
        typer.Option("--snapshot", help="Snapshot id (or unique prefix), or 'latest' (the default)."),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            metavar="TIME",
            help="The newest snapshot taken at or before TIME: ISO 8601 (2026-11-22T10:15Z; UTC "
            "unless an offset is given) or a duration ago (90m, 2d). For rolling back past a bad step.",
            show_default=False,
        ),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", "-i", help="Only matching paths (glob, repeatable).")
    ] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    give_up_after: GiveUpOpt = None,
    dest_endpoint_url: Annotated[
        str | None,
        typer.Option("--dest-endpoint-url", help="S3 endpoint of an s3:// DEST (default: --endpoint-url)."),
    ] = None,
    dest_region: Annotated[
        str | None, typer.Option("--dest-region", help="Region of an s3:// DEST (default: --region).")
    ] = None,
    dest_profile: Annotated[
        str | None, typer.Option("--dest-profile", help="AWS profile for an s3:// DEST (default: --profile).")
    ] = None,
    no_sync: Annotated[
        bool,
        typer.Option(
            "--no-sync",
            help="Do not flush the restored files to disk before reporting success; leave it to the "
            "OS, as restic and rclone do. Faster, but a power cut or OS crash shortly after the restore "
            "may lose or tear restored files although it reported success (running the same "
            "restore again detects and repairs them: every file is re-checked against its digest). "
            "No effect on an s3:// DEST, whose objects are durable once stored.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Restore a snapshot's files into DEST, byte-identical, with mode and mtime.

    Works from --repo URL alone (no config) at a disaster-recovery site. Chunks are fetched in
    parallel; every chunk and every file is checked against its digest before it becomes
    visible, and each file appears atomically (temporary name + rename; in a bucket, one PUT or
    a completed multipart upload). Before reporting success, everything restored is flushed to
    disk at once (one syncfs), so success means durable; --no-sync skips that. Files already
    correct in DEST are skipped, so an interrupted restore is resumed by running it again.
    Nothing is written outside DEST: manifest paths are untrusted and symlinks in DEST are never
    followed. Prints the measured throughput."""
    from replicator.repository import Repository
    from replicator.restore.core import Destination, restore_snapshot, snapshot_at
    from replicator.s3.settings import is_s3_url, parse_s3_url
    from replicator.targets import open_target
    from replicator.units import parse_time_point

    tcfg, _ = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )
    if at is not None and snapshot is not None:
        fail("give either --snapshot or --at, not both", 2)
    when = None
    if at is not None:
        try:
            when = parse_time_point(at, datetime.now(UTC))
        except ValueError as exc:
            fail(f"--at: {exc}", 2)
    if "://" in dest and not is_s3_url(dest):
        fail(f"DEST must be a directory or s3://bucket/prefix (got {dest!r})", 2)
    location = None
    if is_s3_url(dest):
        try:
            location = parse_s3_url(dest)
        except ValueError as exc:
            fail(f"DEST: {exc}", 2)
    # The destination bucket may live elsewhere than the repository; only the endpoint, region
    # and profile are overridable, everything else (timeouts, checksums) follows the target.
    dest_access = tcfg.model_copy(
        update={
            "endpoint_url": dest_endpoint_url or tcfg.endpoint_url,
            "region": dest_region or tcfg.region,
            "profile": dest_profile or tcfg.profile,
        }
    )

    async def go() -> tuple[str, Any]:
        t = await open_target(tcfg)
        out: Destination | None = None
        try:
            r = await Repository.open(t)
            if when is not None:
                sid = await snapshot_at(r, source, when)
            else:
                sid = await r.resolve(source, snapshot)
            manifest = await r.load_manifest(source, sid)
            if location is not None:
                from replicator.restore.s3 import S3Destination
                from replicator.targets import RetryPolicy

                retry = tcfg.retry
                out = await S3Destination.open(
                    location,
                    dest_access,
                    RetryPolicy(retry.initial, retry.max, retry.give_up_after),
                    max_connections=tcfg.concurrency + 4,
                )
            res = await restore_snapshot(
                r,
                manifest,
                out or Path(dest),
                include=include or (),
                progress=make_progress(quiet or as_json),
                sync=not no_sync,
            )
            return sid, res
        finally:
            if out is not None:
                await out.close()
            await t.close()

    sid, res = run_coroutine(go)
    if as_json:
        emit_json({"snapshot": sid, **dataclasses.asdict(res), "bytes_per_second": res.bytes_per_second})
    else:
        rate = f" ({format_size(res.bytes_per_second)}/s)" if res.bytes else ""
        typer.echo(
            f"restored {res.files} files, {format_size(res.bytes)} from {source}/{sid} into {one_line(dest)} "
            f"in {format_duration(res.seconds)}{rate} ({res.skipped_existing} already up to date)"
        )
        for path, why in sorted(res.failures.items()):
            typer.echo(f"  FAILED {display_path(path)}: {one_line(why)}", err=True)
    if not res.ok:
        raise typer.Exit(1)


def _parse_pct(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        pct = float(value.rstrip("%"))
    except ValueError:
        fail(f"--read-data takes a percentage between 0 and 100 (got {value!r})", 2)
    if not 0 < pct <= 100:
        fail(f"--read-data takes a percentage between 0 and 100 (got {value!r})", 2)
    return pct / 100


@app.command()
def verify(
    config_path: ConfigOpt = None,
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Only this target (repeatable).")
    ] = None,
    repo: RepoOpt = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", "-s", help="Only this source (repeatable).")
    ] = None,
    snapshot: Annotated[
        str | None,
        typer.Option(
            "--snapshot",
            help="Only this snapshot id, or 'latest'. Default: check every snapshot; drill the latest.",
        ),
    ] = None,
    read_data: Annotated[
        str | None,
        typer.Option(
            "--read-data",
            metavar="[PCT]",
            help="Also download, decompress and re-hash chunks: all, or a random PCT of them.",
        ),
    ] = None,
    restore_drill: Annotated[
        bool,
        typer.Option(
            "--restore-drill",
            help="Also restore the snapshot of each source into a scratch directory, check every "
            "file's digest and the format of known artifacts (safetensors, torch.save zips, "
            "torch.distributed.checkpoint, .npy/.npz, Parquet, JSON/JSONL), and report restore "
            "throughput, an RTO estimate and the newest checkpoint set training can resume from.",
        ),
    ] = False,
    scratch: Annotated[
        Path | None,
        typer.Option(
            "--scratch",
            metavar="DIR",
            help="Where the drill restores to (DIR/TARGET/SOURCE/), kept afterwards; needs "
            "room for the snapshot. Default: a temporary directory, removed afterwards.",
            show_default=False,
        ),
    ] = None,
    load_torch: Annotated[
        bool,
        typer.Option(
            "--load",
            help="With --restore-drill: also torch.load(weights_only=True) every PyTorch checkpoint "
            "file on the CPU (needs torch installed).",
        ),
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Send again every missing or damaged chunk that the sources still hold (read from "
            "the files the snapshots name); say which could not be repaired. Needs --config.",
        ),
    ] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    give_up_after: GiveUpOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Prove a repository is whole: manifests parse and match their ids, refs point at existing
    snapshots, every referenced chunk exists; with --read-data, chunks decode to their ids.

    With --restore-drill, prove that training can resume from it (docs/DRILLS.md): run it
    before a failover drill and in the CI of a disaster-recovery runbook.

    With --repair, chunks found missing or damaged are uploaded again from the sources'
    files where they still hold them (`verify --read-data --repair` finds and heals damage).

    Names every bad object and file. Exit 0 pass (with --repair: everything found was
    repaired), 1 verification failed, 2 usage/config error, 3 target unreachable."""
    from replicator.repository import Repository
    from replicator.state import StateLockedError, StateStore
    from replicator.targets import open_target
    from replicator.verify.check import verify_repository

    fraction = _parse_pct(read_data)
    if (scratch is not None or load_torch) and not restore_drill:
        fail("--scratch and --load need --restore-drill", 2)
    if load_torch and importlib.util.find_spec("torch") is None:
        fail("--load needs PyTorch installed (pip install torch)", 2)
    if repair and repo is not None:
        fail("--repair reads the sources: give --config, not --repo", 2)
    if repo is not None:
        tcfg, config = repo_target_config(
            None, None, repo, endpoint_url, region, profile, log_level, give_up_after
        )
        tcfgs = [tcfg]
    else:
        config = load(config_path, log_level)
        try:
            chosen = [config.target(n) for n in target] if target else list(config.targets)
            tcfgs = [with_give_up(t, give_up_after) for t in chosen]
        except ConfigError as exc:
            fail(str(exc), 2)

    async def go() -> list[dict[str, Any]]:
        reports: list[dict[str, Any]] = []
        state = None
        if config is not None:
            # If a daemon owns the cache, verify still works; it just cannot update the cache.
            with contextlib.suppress(StateLockedError):
                state = StateStore.open(config.state_dir)
        try:
            for tcfg in tcfgs:
                t = await open_target(tcfg)
                try:
                    r = await Repository.open(t)
                    progress = make_progress(quiet or as_json)
                    rep = await verify_repository(
                        r,
                        sources=source,
                        snapshot=snapshot,
                        read_data=fraction,
                        progress=progress,
                        state=state,
                    )
                    row: dict[str, Any] = {"verify": rep}
                    if repair and rep.damaged:
                        from replicator.verify.repair import repair_chunks

                        assert config is not None
                        row["repair"] = await repair_chunks(r, config, rep.damaged, state)
                    if restore_drill:
                        from replicator.verify.drill import run_drill  # format checks load numpy

                        row["drill"] = await run_drill(
                            r,
                            sources=source,
                            snapshot=snapshot,
                            scratch=scratch,
                            load=load_torch,
                            progress=progress,
                        )
                    reports.append(row)
                finally:
                    await t.close()
        finally:
            if state:
                state.close()
        return reports

    rows = run_coroutine(go)
    if as_json:
        # One object per target: the verify report, plus "drill" with --restore-drill.
        emit_json(
            [
                {
                    **dataclasses.asdict(row["verify"]),
                    **({"drill": _drill_json(row["drill"])} if "drill" in row else {}),
                    **({"repair": dataclasses.asdict(row["repair"])} if "repair" in row else {}),
                }
                for row in rows
            ]
        )
    else:
        for row in rows:
            rep = row["verify"]
            snaps = sum(len(v) for v in rep.sources.values())
            verdict = "OK" if rep.ok else f"{len(rep.problems)} PROBLEMS"
            typer.echo(
                f"{rep.repository}: {verdict}: {len(rep.sources)} sources, {snaps} snapshots, "
                f"{rep.files} files, "
                f"{rep.chunks_referenced} chunks referenced "
                f"({rep.chunks_stored} loose objects, {rep.packs_stored} packs), "
                f"{rep.chunks_read} read ({format_size(rep.bytes_read)}) in {format_duration(rep.seconds)}"
            )
            for p in rep.problems:
                typer.echo(f"  BAD {one_line(p.key)}: {one_line(p.message)}")
            if "repair" in row:
                fixed = row["repair"]
                typer.echo(f"  repaired {len(fixed.repaired)} of {len(rep.damaged)} damaged chunks")
                for key, why in fixed.unrepaired.items():
                    typer.echo(f"  NOT REPAIRED {one_line(key)}: {one_line(why)}")
            if "drill" in row:
                _print_drill(row["drill"])
    if not all(_verified(row) and ("drill" not in row or row["drill"].ok) for row in rows):
        raise typer.Exit(1)


def _verified(row: dict[str, Any]) -> bool:
    """The verify passed, or every problem it found was a chunk that was then repaired."""
    rep = row["verify"]
    if rep.ok:
        return True
    fixed = row.get("repair")
    return bool(fixed and fixed.ok and all(p.chunk for p in rep.problems))


def _drill_json(report: Any) -> dict[str, Any]:
    out = dataclasses.asdict(report)
    out["ok"] = report.ok
    for src, row in zip(report.sources, out["sources"], strict=True):
        row["ok"] = src.ok
    return out


def _print_drill(report: Any) -> None:
    where = report.scratch or "a temporary directory (removed)"
    rto = format_duration(report.rto_seconds) if report.rto_seconds is not None else "unknown"
    typer.echo(
        f"restore drill: {'PASS' if report.ok else 'FAIL'}: {len(report.sources)} sources restored into "
        f"{where} in {format_duration(report.seconds)}; RTO estimate {rto}"
    )
    if not report.sources:
        typer.echo("  no source has a snapshot in this repository: nothing to resume from")
    for s in report.sources:
        if s.snapshot is None:
            typer.echo(f"  {s.source}: FAIL: {'; '.join(s.problems)}")
            continue
        rate = format_size(s.throughput_bytes_per_second) + "/s" if s.throughput_bytes_per_second else "-"
        s_rto = format_duration(s.rto_seconds) if s.rto_seconds is not None else "unknown"
        checked = ", ".join(f"{n} {k}" for k, n in sorted(s.formats.items())) or "none"
        typer.echo(
            f"  {s.source}: {'PASS' if s.ok else 'FAIL'}: snapshot {s.snapshot} "
            f"(age {format_duration(max(s.age_seconds or 0, 0))}), {s.files} files, {format_size(s.bytes)}"
        )
        typer.echo(
            f"    restored {s.restored_files} files in {format_duration(s.restore_seconds)} at {rate}"
            f" ({s.already_present} already present); RTO estimate {s_rto}"
        )
        typer.echo(
            f"    digest failures {len(s.digest_failures)}, format failures {len(s.format_failures)}; "
            f"formats checked: {checked}; loaded with torch: {s.loaded}"
        )
        if s.newest_restorable_set is not None:
            age = format_duration(max(s.newest_restorable_set_age_seconds or 0, 0))
            shown = display_path(s.newest_restorable_set)
            typer.echo(f"    newest restorable checkpoint set: {shown} (written {age} ago)")
        for path, why in sorted(s.digest_failures.items()):
            typer.echo(f"    DIGEST FAILED {display_path(path)}: {one_line(why)}")
        for path, why in sorted(s.format_failures.items()):
            typer.echo(f"    FORMAT FAILED {display_path(path)}: {one_line(why)}")
        for why in s.problems:
            typer.echo(f"    FAILED: {one_line(why)}")


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the demo.")] = Path(
        "replicator-demo"
    ),
    quiet: QuietOpt = False,
) -> None:
    """Replicate demo checkpoint data to a local target: no cloud account needed.

    Creates bf16 safetensors checkpoint sets and a JSONL dataset under DIR/primary, a config
    at DIR/replicator.yaml, runs `sync` to DIR/secondary, then `verify --read-data` and a
    restore drill (`verify --restore-drill`)."""
    from replicator.demo import create_demo

    directory = directory.resolve()
    cfg_path = create_demo(directory)
    typer.echo(f"demo data and config written under {directory}")
    typer.echo(f"$ replicator sync --config {cfg_path}")
    _invoke(["sync", "--config", str(cfg_path), *(["--quiet"] if quiet else [])])
    typer.echo(f"$ replicator verify --config {cfg_path} --read-data")
    _invoke(["verify", "--config", str(cfg_path), "--read-data", *(["--quiet"] if quiet else [])])
    typer.echo(f"$ replicator verify --config {cfg_path} --restore-drill")
    _invoke(["verify", "--config", str(cfg_path), "--restore-drill", *(["--quiet"] if quiet else [])])
    typer.echo(
        "\nNext: list snapshots with\n"
        f"  replicator snapshots --repo {directory / 'secondary'}\n"
        "and restore the newest checkpoint anywhere, without the config, with\n"
        f"  replicator restore --repo {directory / 'secondary'} --source checkpoints /tmp/restored"
    )


def _optional_values(args: list[str]) -> list[str]:
    """Let ``--read-data`` stand alone meaning 100 %: click options cannot take an optional
    value, so a bare ``--read-data`` gets its default spelled out before parsing."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--read-data":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("-") or not nxt.rstrip("%").replace(".", "", 1).isdigit():
                out.append("100")
    return out


def _invoke(args: list[str]) -> None:
    try:
        app(_optional_values(args), standalone_mode=False)
    except typer.Exit as exc:
        if exc.exit_code:
            raise


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)
    ] = False,
) -> None:
    if version:
        typer.echo(f"replicator {__version__}")
        raise typer.Exit(0)


def main() -> None:
    try:
        app(_optional_values(sys.argv[1:]), prog_name="replicator")
    except ReplicatorError as exc:  # pragma: no cover - commands convert their own errors
        typer.echo(f"replicator: error: {exc}", err=True)
        sys.exit(exc.exit_code)
