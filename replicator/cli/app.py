"""The ``replicator`` command line. Commands are thin: each parses its options, calls one library
function that returns a result object, and prints it as text (:mod:`replicator.cli.render`) or, with
``--json``, as JSON. Options are declared in :mod:`replicator.cli.options`; errors, exit
codes, config loading and output helpers are in :mod:`replicator.cli.support`.

Exit codes (all commands): 0 success; 1 the operation failed or found problems; 2 usage or
configuration error; 3 a target could not be reached; 4 (sync) published, but some files could
not be read; 130 interrupted (support.EXIT_CODES; README's table). Errors, usage errors
included, are one line on stderr, a JSON object with --json (support.OneLineErrors).

Start-up time counts (a one-shot ``sync`` of a few files is mostly interpreter start-up), so
this module imports only typer and light helpers; each command imports the library modules it
uses when it runs. ``replicator --help`` then never loads pydantic, numpy, structlog or
asyncio.

The commands live by what they do: :mod:`.replication`, :mod:`.repository`,
:mod:`.maintenance`; this module holds the application and what they share.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from replicator import __version__
from replicator.cli import options as opt
from replicator.cli.support import (
    LogChoice,
    OneLineErrors,
    error_line,
    fail,
    from_environment,
    load,
    on_command_line,
    setup_logging,
)
from replicator.errors import ConfigError, ReplicatorError

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


def target_configs(
    config_path: Path | None,
    targets: list[str] | None,
    repo: str | None,
    endpoint: str | None,
    region: str | None,
    profile: str | None,
    log_level: str | None,
    give_up_after: str | None,
) -> list[TargetConfig]:
    """``--repo``, or the config's targets (all, or those named by ``--target``): for the
    commands that work on each target in turn (``prune``, ``stats``)."""
    repo = yield_env_repo(repo)
    if repo is not None:
        cfg, _ = repo_target_config(None, None, repo, endpoint, region, profile, log_level, give_up_after)
        return [cfg]
    config = load(config_path, log_level)
    try:
        chosen = [config.target(n) for n in targets] if targets else list(config.targets)
    except ConfigError as exc:
        fail(str(exc), 2)
    return [with_give_up(c, give_up_after) for c in chosen]


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
