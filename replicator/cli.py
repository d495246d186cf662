"""The ``replicator`` command line. Commands are thin: each parses its options, calls one library
function that returns a result object, and prints it as text (:mod:`replicator.render`) or, with
``--json``, as JSON. Options are declared in :mod:`replicator.cli_options`; errors, exit
codes, config loading and output helpers are in :mod:`replicator.cli_support`.

Exit codes (all commands): 0 success; 1 the operation failed or found problems; 2 usage or
configuration error; 3 a target could not be reached; 4 (sync) published, but some files could
not be read; 130 interrupted (cli_support.EXIT_CODES; README's table). Errors, usage errors
included, are one line on stderr, a JSON object with --json (cli_support.OneLineErrors).

Start-up time counts (a one-shot ``sync`` of a few files is mostly interpreter start-up), so
this module imports only typer and light helpers; each command imports the library modules it
uses when it runs. ``replicator --help`` then never loads pydantic, numpy, structlog or
asyncio.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from replicator import __version__, render
from replicator import cli_options as opt
from replicator.cli_support import (
    EXIT_SEVERITY,
    LogChoice,
    OneLineErrors,
    check_selection,
    emit,
    emit_json,
    error_line,
    fail,
    from_environment,
    load,
    on_command_line,
    parse_option,
    read_data_fraction,
    run_coroutine,
    setup_logging,
    show,
)
from replicator.errors import ConfigError, ReplicatorError
from replicator.progress import make_progress

if TYPE_CHECKING:
    from replicator.config import Config, TargetConfig

app = typer.Typer(
    name="replicator",
    help="Keep ML training state portable: replicate checkpoints, datasets and embeddings to "
    "secondary S3-compatible or POSIX targets, deduplicated and verifiable.\n\n"
    "Start with `replicator demo`, then see `replicator COMMAND --help`.",
    no_args_is_help=True,
    cls=OneLineErrors,  # usage errors: one line, not click's box (issue 22)
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
    """Resolve ``--config/--target`` or ``--repo`` into one target's settings. REPLICATOR_REPO
    applies only when neither --config nor --target is given on the command line."""
    from replicator.config import TARGET_URLS, target_config

    repo = yield_env_repo(repo)
    if repo is not None:
        if config_path is not None and target is not None:
            fail("give either --repo or --config with --target, not both", 2)
        setup_logging(log_level)
        url = repo if "://" in repo else str(Path(repo).resolve())
        # --endpoint, --region and --profile apply to s3:// repositories only.
        kind = TARGET_URLS.get(url)
        fields = kind.model.model_fields if kind is not None else {}
        options = {"endpoint_url": endpoint, "region": region, "profile": profile}
        given: dict[str, object] = {k: v for k, v in options.items() if v is not None and k in fields}
        given.update(repo_sse_from_env(fields))
        try:
            origin = f"--repo (with {REPO_CUSTOMER_KEY_ENV})" if "sse" in given else "--repo"
            cfg = target_config({"name": "repo", "url": url, **given}, origin=origin)
        except ConfigError as exc:
            fail(str(exc), 2)
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


def yield_env_repo(repo: str | None) -> str | None:
    """``--repo``, unless it came from REPLICATOR_REPO and --config or --target was given on
    the command line: what is typed wins over the environment."""
    typed_instead = on_command_line("config_path") or on_command_line("target")
    return None if repo is not None and from_environment("repo") and typed_instead else repo


REPO_CUSTOMER_KEY_ENV = "REPLICATOR_SSE_CUSTOMER_KEY"
"""``--repo s3://...`` of a repository written with ``sse: {type: customer}``: its SSE-C key
(base64), from the environment only (a command line is visible in ``ps``)."""


def repo_sse_from_env(fields: Mapping[str, object]) -> dict[str, object]:
    """The ``sse`` setting of a ``--repo`` target whose SSE-C key is in the environment."""
    import os

    from replicator import log

    key = os.environ.get(REPO_CUSTOMER_KEY_ENV)
    if not key or "sse" not in fields:
        return {}
    log.REDACTOR.add([key])
    return {"sse": {"type": "customer", "customer_key": key}}


def only_source(config: Config | None, source: str | None) -> str | None:
    """``--source``, else the config's only source; None leaves it to the repository (its only
    source). A given name is not checked against the config: a repository keeps the snapshots
    of sources since removed from it (the repository names what it holds)."""
    if source is None and config is not None and len(config.sources) == 1:
        return config.sources[0].name
    return source


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


# -- commands ---------------------------------------------------------------------------------


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
def forget(
    config_path: opt.ConfigPath = None,
    source: opt.Sources = None,
    target: opt.Targets = None,
    dry_run: opt.ForgetDryRun = False,
    give_up_after: opt.GiveUp = None,
    as_json: opt.Json = False,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Apply each source's retention policy on each target now: list what is kept (and why)
    and what is dropped, and delete the dropped snapshot manifests.

    The daemon and `sync` apply the policy after each publish already; this applies a changed
    policy at once, or shows what a policy keeps (`--dry-run`). Only snapshot manifests are
    deleted: never chunks, never the latest, never the last snapshot holding a checkpoint set
    the policy keeps, never a manifest that cannot be read. Exit codes: 0 done; 1 a source
    failed on some target (what was deleted before is listed); 3 a target could not be
    reached."""
    from replicator.retention.apply import forget as apply_policies

    config = load(config_path, log_level)
    check_selection(config, source, target)
    if give_up_after is not None:
        targets = [with_give_up(t, give_up_after) for t in config.targets]
        config = config.model_copy(update={"targets": targets})
    report = run_coroutine(lambda: apply_policies(config, sources=source, targets=target, dry_run=dry_run))
    emit(as_json, report.to_json(), lambda: render.forget_lines(report))
    if report.exit_code:
        raise typer.Exit(report.exit_code)


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
def snapshots(
    config_path: opt.ConfigPath = None,
    target: opt.Target = None,
    repo: opt.Repo = None,
    source: opt.Source = None,
    endpoint_url: opt.Endpoint = None,
    region: opt.Region = None,
    profile: opt.Profile = None,
    give_up_after: opt.GiveUp = None,
    as_json: opt.Json = False,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """List the snapshots in a target's repository, oldest first (`*` marks the latest)."""
    from replicator.repository import snapshot_rows

    tcfg, _ = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )
    rows = run_coroutine(lambda: snapshot_rows(tcfg, source))
    emit(as_json, rows, lambda: render.snapshot_lines(rows))


@app.command()
def prune(
    config_path: opt.ConfigPath = None,
    target: opt.Targets = None,
    repo: opt.Repo = None,
    grace: opt.Grace = "1h",
    dry_run: opt.PruneDryRun = False,
    endpoint_url: opt.Endpoint = None,
    region: opt.Region = None,
    profile: opt.Profile = None,
    give_up_after: opt.GiveUp = None,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    log_level: opt.LogLevel = None,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Garbage collection: delete chunk objects and packs no snapshot manifest references.

    Two phases, safe against crashes and concurrent writers (docs/FORMAT.md section 10): each
    run deletes what a run at least --grace earlier planned and is still unreferenced, then
    plans what is unreferenced now. Run it after retention removed manifests: the first run
    plans, a run after the grace period deletes. Refuses (exit 1, nothing deleted) when a
    listing fails or a manifest cannot be read."""
    from replicator.gc.prune import PruneOptions, run_prune
    from replicator.units import parse_duration

    options = PruneOptions(grace=parse_option("--grace", grace, parse_duration), dry_run=dry_run)
    repo = yield_env_repo(repo)
    if repo is not None:
        tcfgs = [
            repo_target_config(None, None, repo, endpoint_url, region, profile, log_level, give_up_after)[0]
        ]
    else:
        config = load(config_path, log_level)
        try:
            chosen = [config.target(n) for n in target] if target else list(config.targets)
        except ConfigError as exc:
            fail(str(exc), 2)
        tcfgs = [with_give_up(c, give_up_after) for c in chosen]
    progress = make_progress(quiet or as_json)
    results = run_coroutine(lambda: run_prune(tcfgs, options, progress))
    emit(as_json, [r.to_json() for r in results], lambda: render.prune_lines(results))


@app.command()
def restore(
    dest: opt.Dest,
    source: opt.RestoreSource = None,
    config_path: opt.ConfigPath = None,
    target: opt.Target = None,
    repo: opt.Repo = None,
    snapshot: opt.RestoreSnapshot = None,
    at: opt.At = None,
    include: opt.Include = None,
    endpoint_url: opt.Endpoint = None,
    region: opt.Region = None,
    profile: opt.Profile = None,
    give_up_after: opt.GiveUp = None,
    dest_endpoint_url: opt.DestEndpoint = None,
    dest_region: opt.DestRegion = None,
    dest_profile: opt.DestProfile = None,
    dest_sse: opt.DestSse = None,
    dest_kms_key_id: opt.DestKmsKey = None,
    dest_storage_class: opt.DestStorageClass = None,
    dest_tags: opt.DestTags = None,
    no_sync: opt.NoSync = False,
    overwrite: opt.Overwrite = "if-changed",
    dry_run: opt.DryRun = False,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    log_level: opt.LogLevel = None,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Restore a snapshot's files into DEST, byte-identical, with mode and mtime.

    Works from --repo URL alone (no config) at a disaster-recovery site. Chunks are fetched in
    parallel; every chunk and every file is checked against its digest before it becomes
    visible, and each file appears atomically (temporary name + rename; in a bucket, one PUT or
    a completed multipart upload). Before reporting success, everything restored is flushed to
    disk at once (one syncfs), so success means durable; --no-sync skips that. Files already
    correct in DEST are skipped, so an interrupted restore is resumed by running it again.
    Nothing is written outside DEST: manifest paths are untrusted and symlinks in DEST are never
    followed. Prints the measured throughput.

    Into a directory that already holds files, look first, then choose what may be replaced
    (files DEST has that the snapshot does not are never touched):

        replicator restore --repo s3://bkt/repo -s ckpt --dry-run ./run-7

        replicator restore --repo s3://bkt/repo -s ckpt --overwrite never ./run-7

    See what a snapshot holds with `replicator ls`."""
    from replicator.restore.run import DestAccess, dest_object_options, parse_destination, run_restore
    from replicator.units import parse_time_point

    tcfg, config = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )
    source = only_source(config, source)
    if at is not None and snapshot is not None:
        fail("give either --snapshot or --at, not both", 2)
    when = None if at is None else parse_option("--at", at, lambda v: parse_time_point(v, datetime.now(UTC)))
    where = parse_option(None, dest, parse_destination)
    try:
        objects = dest_object_options(dest_sse, dest_kms_key_id, dest_storage_class, dest_tags or ())
    except ConfigError as exc:
        fail(str(exc), 2)
    if objects is not None and isinstance(where, Path):
        fail("--dest-sse, --dest-kms-key-id, --dest-storage-class and --dest-tag need an s3:// DEST", 2)
    access = DestAccess(dest_endpoint_url, dest_region, dest_profile, objects)
    progress = make_progress(quiet or as_json)
    outcome = run_coroutine(
        lambda: run_restore(
            tcfg,
            source,
            where,
            when or snapshot,
            include or (),
            access,
            sync=not no_sync,
            progress=progress,
            overwrite=overwrite,
            dry_run=dry_run,
        )
    )
    if as_json:
        emit_json(outcome.to_json())
    else:
        show(render.restore_conflict_lines(outcome))
        typer.echo(render.restore_line(outcome, dest))
        show(render.restore_failure_lines(outcome), err=True)
    if not outcome.result.ok:
        raise typer.Exit(1)


# -- looking inside snapshots (issue 22) ------------------------------------------------------


@app.command()
def ls(
    source: opt.InspectSource,
    globs: opt.LsGlobs = None,
    config_path: opt.ConfigPath = None,
    target: opt.Target = None,
    repo: opt.Repo = None,
    snapshot: opt.RestoreSnapshot = None,
    endpoint_url: opt.Endpoint = None,
    region: opt.Region = None,
    profile: opt.Profile = None,
    give_up_after: opt.GiveUp = None,
    as_json: opt.Json = False,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """List the files of a snapshot (default: the latest) without restoring anything: mode,
    size, modification time (UTC) and path; for a checkpoint source, grouped by checkpoint set.

    GLOBs select files as restore's --include does, so `ls` shows what such a restore would
    write. Only the manifest is read. Names that are not printable or not UTF-8 are shown
    quoted ($'...'); --json carries their exact bytes (path_b64).

        replicator ls --repo s3://bkt/repo -s ckpt

        replicator ls -c replicator.yaml -t offsite -s ckpt --snapshot 20261207 'step-0002*'"""
    from replicator.contents import list_snapshot

    tcfg, _ = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )
    for g in globs or ():
        parse_option("GLOB", g, _check_glob)
    listing = run_coroutine(lambda: list_snapshot(tcfg, source, snapshot, globs or ()))
    emit(as_json, listing.to_json(), lambda: render.listing_lines(listing))


@app.command()
def diff(
    source: opt.InspectSource,
    old: opt.DiffOld,
    new: opt.DiffNew,
    config_path: opt.ConfigPath = None,
    target: opt.Target = None,
    repo: opt.Repo = None,
    endpoint_url: opt.Endpoint = None,
    region: opt.Region = None,
    profile: opt.Profile = None,
    give_up_after: opt.GiveUp = None,
    as_json: opt.Json = False,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """What changed between two snapshots of a source: files added (+), removed (-) and changed
    (M: other bytes, by digest), with sizes and totals; for a checkpoint source, grouped by
    checkpoint set (a set added or removed as a whole says so).

    Only the two manifests are read.

        replicator diff --repo /mnt/dr/repo -s ckpt 20261206 latest"""
    from replicator.contents import diff_snapshots

    tcfg, _ = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )
    result = run_coroutine(lambda: diff_snapshots(tcfg, source, old, new))
    emit(as_json, result.to_json(), lambda: render.diff_lines(result))


def _check_glob(pattern: str) -> str:
    from replicator.globs import compile_glob

    compile_glob(pattern)
    return pattern


@app.command()
def verify(
    config_path: opt.ConfigPath = None,
    target: opt.Targets = None,
    repo: opt.Repo = None,
    source: opt.Sources = None,
    snapshot: opt.VerifySnapshot = None,
    read_data: opt.ReadData = None,
    restore_drill: opt.RestoreDrill = False,
    scratch: opt.Scratch = None,
    load_torch: opt.LoadTorch = False,
    repair: opt.Repair = False,
    endpoint_url: opt.Endpoint = None,
    region: opt.Region = None,
    profile: opt.Profile = None,
    give_up_after: opt.GiveUp = None,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    log_level: opt.LogLevel = None,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Prove a repository is whole: manifests parse and match their ids, refs point at existing
    snapshots, every referenced chunk exists; with --read-data, chunks decode to their ids.

    With --restore-drill, prove that training can resume from it (docs/DRILLS.md): run it
    before a failover drill and in the CI of a disaster-recovery runbook.

    With --repair, chunks found missing or damaged are uploaded again from the sources'
    files where they still hold them (`verify --read-data --repair` finds and heals damage).

    Names every bad object and file. Exit 0 pass (with --repair: everything found was
    repaired), 1 verification failed, 2 usage/config error, 3 target unreachable."""
    from replicator.verify.run import VerifyOptions, run_verify

    repo = yield_env_repo(repo)
    fraction = read_data_fraction(read_data)
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
    options = VerifyOptions(source, snapshot, fraction, repair, restore_drill, scratch, load_torch)
    rows = run_coroutine(lambda: run_verify(tcfgs, config, options, make_progress(quiet or as_json)))
    emit(as_json, [row.to_json() for row in rows], lambda: render.verify_lines(rows))  # a row per target
    if not all(row.ok for row in rows):
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


# -- config ---------------------------------------------------------------------------------

config_app = typer.Typer(
    name="config",
    help="Check a configuration file.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(config_app)


@config_app.command("check")
def config_check(
    config_path: opt.ConfigPath = None,
    online: opt.Online = False,
    as_json: opt.Json = False,
    log_level: opt.LogLevel = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
    log_format: opt.LogFormat = None,
) -> None:
    """Validate a config file: every problem, one line each, then a summary of its sources and
    targets.

    With --online, also reach each source and target and try what replicator needs: list and
    read a source; put, get, list and delete a scratch object (tmp/config-check-...) on a
    target. Exit codes: 0 fine; 2 the config is invalid; 3 a source or target could not be
    reached; 1 a permission is missing."""
    from replicator.config_check import check_offline, check_online

    if config_path is None:
        fail("--config is required (or set REPLICATOR_CONFIG)", 2)
    setup_logging(log_level)
    report, config = check_offline(config_path)
    if online and config is not None and not report.problems:
        run_coroutine(lambda: check_online(config, report))
    emit(as_json, report.to_json(), lambda: render.config_check_lines(report))
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.callback(invoke_without_command=True)
def _root(version: opt.Version = False) -> None:
    LogChoice.reset()  # an earlier in-process invocation's -v/-q/--log-format (tests, demo)
    if version:
        typer.echo(f"replicator {__version__}")
        raise typer.Exit(0)


def main() -> None:
    try:
        app(opt.optional_values(sys.argv[1:]), prog_name="replicator")
    except ReplicatorError as exc:  # pragma: no cover - commands convert their own errors
        typer.echo(error_line(str(exc), exc.exit_code, "--json" in sys.argv), err=True)
        sys.exit(exc.exit_code)
