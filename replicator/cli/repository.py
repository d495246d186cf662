"""Commands that read a repository back: ``snapshots``, ``ls``, ``diff``, ``restore`` and
``verify`` (structure, data, repair, drills).

Thin, like every command (:mod:`replicator.cli`): parse, call one library function, render."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

from replicator.cli import options as opt
from replicator.cli import render
from replicator.cli.app import app, only_source, repo_target_config, with_give_up, yield_env_repo
from replicator.cli.support import (
    emit,
    emit_json,
    fail,
    load,
    parse_option,
    read_data_fraction,
    run_coroutine,
    show,
)
from replicator.errors import ConfigError
from replicator.progress import make_progress


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
def parts(
    source: opt.InspectSource,
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
    """Show what each instance of a shared (multi-node) source has contributed: per checkpoint
    set, whose parts are in, whose are missing and for how long; per instance, when it last
    said it was alive. Read-only; works from any host (--repo)."""
    from replicator.shared.report import parts_report

    tcfg, config = repo_target_config(
        config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after
    )
    scfg = None
    if config is not None:
        try:
            scfg = config.source(source)
        except ConfigError as exc:
            fail(str(exc), 2)
    report = run_coroutine(lambda: parts_report(tcfg, source, scfg))
    emit(as_json, report.to_json(), lambda: render.parts_lines(report))


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


def _check_glob(pattern: str) -> str:
    from replicator.globs import compile_glob

    compile_glob(pattern)
    return pattern


def _require_torch() -> None:
    """--load without a working PyTorch is a usage error: say so before restoring anything."""
    from replicator.verify.load import torch_unavailable

    if (why := torch_unavailable()) is not None:
        fail(f"--load needs PyTorch, which cannot be imported here ({why}; pip install torch)", 2)


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
    if load_torch:
        _require_torch()
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
