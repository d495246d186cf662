"""Commands that maintain a repository or a configuration: ``forget`` (retention),
``prune`` (garbage collection) and ``config check``.

Thin, like every command (:mod:`replicator.cli`): parse, call one library function, render."""

from __future__ import annotations

import typer

from replicator.cli import options as opt
from replicator.cli import render
from replicator.cli.app import app, target_configs, with_give_up
from replicator.cli.support import (
    check_selection,
    emit,
    fail,
    load,
    parse_option,
    run_coroutine,
    setup_logging,
)
from replicator.progress import make_progress


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
    tcfgs = target_configs(config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after)
    progress = make_progress(quiet or as_json)
    results = run_coroutine(lambda: run_prune(tcfgs, options, progress))
    emit(as_json, [r.to_json() for r in results], lambda: render.prune_lines(results))


@app.command()
def stats(
    config_path: opt.ConfigPath = None,
    target: opt.Targets = None,
    repo: opt.Repo = None,
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
    """What each target's repository stores and what keeping it costs: stored bytes by prefix,
    live (what retained snapshots reference), reclaimable (what `prune` would free), dedup and
    compression ratios, the bytes only each snapshot holds (what forgetting it would free), and
    the monthly storage cost at the target's `cost.storage_usd_per_gib_month`.

    Read-only: reads every manifest and lists chunks/ and packs/ once; writes nothing, needs
    no state (works on a repository written by another host). Exit 1 when a manifest cannot be
    read or there is no repository."""
    from replicator.gc.stats import run_stats

    tcfgs = target_configs(config_path, target, repo, endpoint_url, region, profile, log_level, give_up_after)
    progress = make_progress(quiet or as_json)
    results = run_coroutine(lambda: run_stats(tcfgs, progress))
    emit(as_json, [r.to_json() for r in results], lambda: render.stats_lines(results))


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
