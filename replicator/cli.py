"""The ``replicator`` command line. Commands are thin: parse options, call the library, print.

Exit codes (all commands): 0 success; 1 the operation failed or found problems; 2 usage or
configuration error; 3 a target could not be reached. Errors are one line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from replicator import __version__, log
from replicator.config import Config, RetryConfig, TargetConfig, load_config
from replicator.errors import ConfigError, ReplicatorError
from replicator.progress import make_progress
from replicator.repository import Repository
from replicator.state import StateLockedError, StateStore
from replicator.targets import open_target
from replicator.units import format_duration, format_size

T = TypeVar("T")

app = typer.Typer(
    name="replicator",
    help="Keep ML training state portable: replicate checkpoints, datasets and embeddings to "
    "secondary S3-compatible or POSIX targets, deduplicated and verifiable.\n\n"
    "Start with `replicator demo`, then see `replicator COMMAND --help`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", help="debug, info, warning or error (default: from config, else warning)."),
]


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"replicator: error: {message}", err=True)
    raise typer.Exit(code)


def run_coroutine(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning library errors into a one-line message and exit code."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except ReplicatorError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def setup_logging(level: str | None, config: Config | None = None, default: str = "warning") -> None:
    """--log-level, else the config's log_level, else the command's default (one-shot commands
    stay quiet; the daemon logs at info)."""
    chosen = level or (config.log_level if config else None) or default
    if chosen not in ("debug", "info", "warning", "error"):
        fail(f"--log-level must be debug, info, warning or error (got {chosen!r})", 2)
    log.configure(chosen)
    if config is not None:
        log.REDACTOR.add(config.secret_values())


def load(config_path: Path | None, log_level: str | None, default_level: str = "warning") -> Config:
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
) -> tuple[TargetConfig, Config | None]:
    """Resolve ``--config/--target`` or ``--repo`` into one target's settings."""
    if repo is not None:
        if config_path is not None and target is not None:
            fail("give either --repo or --config with --target, not both", 2)
        setup_logging(log_level)
        url = repo if "://" in repo else str(Path(repo).resolve())
        try:
            cfg = TargetConfig(
                name="repo",
                url=url,
                endpoint_url=endpoint,
                region=region,
                profile=profile,
                retry=RetryConfig(give_up_after=60.0),
            )
        except ValueError as exc:
            fail(f"--repo: {exc}", 2)
        return cfg, None
    config = load(config_path, log_level)
    if target is None:
        if len(config.targets) != 1:
            fail("--target is required when the config has several targets (or use --repo)", 2)
        return config.targets[0], config
    try:
        return config.target(target), config
    except ConfigError as exc:
        fail(str(exc), 2)


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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """One replication pass: every source (or --source) to every target (or --target).

    Unchanged files are not read again; chunks a target already holds are not sent again.
    A checkpoint set is published only when complete. Exits 1 if any target failed or any
    file could not be read consistently (the rest is still published)."""
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
        lambda: run_sync(config, sources=source, targets=target, progress=make_progress(quiet or as_json))
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
                typer.echo(f"  held back {name}: {why}")
            for path, why in sorted(r.skipped.items()):
                typer.echo(f"  skipped {path}: {why}")
            for t in r.targets:
                u = t.uploads
                if t.status == "failed":
                    typer.echo(f"  -> {t.target}: FAILED: {t.error}")
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
    if not all(r.ok for r in results) or target_errors:
        raise typer.Exit(1)


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
        typer.echo(f"  skipped {path}: {why}")


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
    as_json: JsonOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """List the snapshots in a target's repository, oldest first (* = latest)."""
    tcfg, _ = repo_target_config(config_path, target, repo, endpoint_url, region, profile, log_level)

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
        sets = f"  sets: {', '.join(row['sets'])}" if row["sets"] else ""
        typer.echo(
            f"{mark} {row['source']:<16} {row['snapshot']}  {row['files']:>6} files "
            f"{format_size(row['bytes']):>11}{sets}"
        )


@app.command()
def restore(
    dest: Annotated[
        Path, typer.Argument(help="Destination directory (created if needed).", show_default=False)
    ],
    source: Annotated[str, typer.Option("--source", "-s", help="Source whose snapshot to restore.")],
    config_path: ConfigOpt = None,
    target: TargetOpt = None,
    repo: RepoOpt = None,
    snapshot: Annotated[
        str, typer.Option("--snapshot", help="Snapshot id (or unique prefix), or 'latest'.")
    ] = "latest",
    include: Annotated[
        list[str] | None, typer.Option("--include", "-i", help="Only matching paths (glob, repeatable).")
    ] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Restore a snapshot's files into DEST, byte-identical, with mode and mtime.

    Works from --repo URL alone (no config) at a disaster-recovery site. Every chunk and every
    file is checked against its digest before it becomes visible; files already correct in
    DEST are skipped; nothing is written outside DEST."""
    from replicator.restore import restore_snapshot

    tcfg, _ = repo_target_config(config_path, target, repo, endpoint_url, region, profile, log_level)

    async def go() -> tuple[str, Any]:
        t = await open_target(tcfg)
        try:
            r = await Repository.open(t)
            sid = await r.resolve(source, snapshot)
            manifest = await r.load_manifest(source, sid)
            res = await restore_snapshot(
                r, manifest, dest, include=include or (), progress=make_progress(quiet or as_json)
            )
            return sid, res
        finally:
            await t.close()

    sid, res = run_coroutine(go)
    if as_json:
        emit_json({"snapshot": sid, **dataclasses.asdict(res)})
    else:
        typer.echo(
            f"restored {res.files} files, {format_size(res.bytes)} from {source}/{sid} into {dest} "
            f"in {format_duration(res.seconds)} ({res.skipped_existing} already up to date)"
        )
        for path, why in sorted(res.failures.items()):
            typer.echo(f"  FAILED {path}: {why}", err=True)
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
        str | None, typer.Option("--snapshot", help="Only this snapshot id, or 'latest'.")
    ] = None,
    read_data: Annotated[
        str | None,
        typer.Option(
            "--read-data",
            metavar="[PCT]",
            help="Also download, decompress and re-hash chunks: all, or a random PCT of them.",
        ),
    ] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Prove a repository is whole: manifests parse and match their ids, refs point at existing
    snapshots, every referenced chunk exists; with --read-data, chunks decode to their ids.

    Names every bad object. Exit 0 pass, 1 problems found, 2 usage/config error, 3 target
    unreachable."""
    from replicator.verify import verify_repository

    fraction = _parse_pct(read_data)
    if repo is not None:
        tcfg, config = repo_target_config(None, None, repo, endpoint_url, region, profile, log_level)
        tcfgs = [tcfg]
    else:
        config = load(config_path, log_level)
        try:
            tcfgs = [config.target(n) for n in target] if target else list(config.targets)
        except ConfigError as exc:
            fail(str(exc), 2)

    async def go() -> list[Any]:
        reports = []
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
                    reports.append(
                        await verify_repository(
                            r,
                            sources=source,
                            snapshot=snapshot,
                            read_data=fraction,
                            progress=make_progress(quiet or as_json),
                            state=state,
                        )
                    )
                finally:
                    await t.close()
        finally:
            if state:
                state.close()
        return reports

    reports = run_coroutine(go)
    if as_json:
        emit_json(reports)
    else:
        for rep in reports:
            snaps = sum(len(v) for v in rep.sources.values())
            verdict = "OK" if rep.ok else f"{len(rep.problems)} PROBLEMS"
            typer.echo(
                f"{rep.repository}: {verdict}: {len(rep.sources)} sources, {snaps} snapshots, "
                f"{rep.files} files, "
                f"{rep.chunks_referenced} chunks referenced ({rep.chunks_stored} stored), "
                f"{rep.chunks_read} read ({format_size(rep.bytes_read)}) in {format_duration(rep.seconds)}"
            )
            for p in rep.problems:
                typer.echo(f"  BAD {p.key}: {p.message}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the demo.")] = Path(
        "replicator-demo"
    ),
    quiet: QuietOpt = False,
) -> None:
    """Replicate demo checkpoint data to a local target: no cloud account needed.

    Creates bf16 safetensors checkpoint sets and a JSONL dataset under DIR/primary, a config
    at DIR/replicator.yaml, runs `sync` to DIR/secondary and then `verify --read-data`."""
    from replicator.demo import create_demo

    directory = directory.resolve()
    cfg_path = create_demo(directory)
    typer.echo(f"demo data and config written under {directory}")
    typer.echo(f"$ replicator sync --config {cfg_path}")
    _invoke(["sync", "--config", str(cfg_path), *(["--quiet"] if quiet else [])])
    typer.echo(f"$ replicator verify --config {cfg_path} --read-data")
    _invoke(["verify", "--config", str(cfg_path), "--read-data", *(["--quiet"] if quiet else [])])
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
