"""``replicator config check``: is a configuration file valid, and may replicator do what it
configures?

Offline, the file is parsed and validated with every problem listed (one line each), and
each S3 source's and target's AWS profile is looked up in the AWS config files; a summary
of the sources and targets follows. ``--online`` then reaches each of them and tries what
replicator will need: a source is listed and one of its files read (one byte); on a target
a scratch object (``tmp/config-check-<random>``, docs/FORMAT.md) is written, read back,
listed and deleted, and an S3 target reports the checksum its PUTs carry (with ``checksum:
auto``, the one its first PUT found the server verifies). Each check is reported as ok or
failed with its error.

Nothing a repository holds is read or changed, and a source is never written to.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replicator.config import (
    Config,
    PosixSourceConfig,
    S3SourceConfig,
    S3TargetConfig,
    SourceConfig,
    TargetConfig,
    check_config_file,
)
from replicator.errors import ReplicatorError, TargetUnreachableError

SCRATCH_PREFIX = "tmp/"
"""Where the online check writes its scratch object on a target (deleted at once)."""


@dataclass
class Endpoint:
    """One source or target, as the summary shows it."""

    kind: str
    """``source`` or ``target``."""
    name: str
    url: str
    settings: dict[str, str] = field(default_factory=dict)
    """What matters at a glance: a source's kind, an S3 profile, encryption, storage class."""


@dataclass
class Check:
    """One online check: ``subject`` (``target t1``) may ``check`` (list, read, put, get, delete;
    ``checksum``: which one its PUTs carry, in ``error`` though ok)."""

    subject: str
    check: str
    ok: bool
    error: str | None = None
    unreachable: bool = False
    """The failure was that it could not be reached at all (exit code 3)."""


@dataclass
class ConfigReport:
    path: str
    problems: list[str] = field(default_factory=list)
    """Validation problems (exit code 2), one line each."""
    endpoints: list[Endpoint] = field(default_factory=list)
    online: bool = False
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        """2 invalid; 3 something could not be reached; 1 a permission is missing; 0 fine."""
        if self.problems:
            return 2
        if any(c.unreachable for c in self.checks):
            return 3
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "exit_code": self.exit_code}


def check_offline(path: Path) -> tuple[ConfigReport, Config | None]:
    """Validate ``path``: its problems (every one) and its summary."""
    from replicator.s3.settings import missing_profiles

    report = ConfigReport(str(path))
    config, report.problems = check_config_file(path)
    if config is None:
        return report, None
    report.problems += [str(e) for e in missing_profiles(config)]
    report.endpoints = [_summary("source", s) for s in config.sources]
    report.endpoints += [_summary("target", t) for t in config.targets]
    return report, config


def _summary(kind: str, item: SourceConfig | TargetConfig) -> Endpoint:
    settings: dict[str, str] = {}
    if isinstance(item, SourceConfig):
        settings["kind"] = item.kind
    for name in ("endpoint_url", "region", "profile", "storage_class"):
        value = getattr(item, name, None)
        if value:
            settings[name] = str(value)
    if isinstance(item, S3TargetConfig):
        if item.sse is not None:
            settings["sse"] = item.sse.type + (f" ({item.sse.kms_key_id})" if item.sse.kms_key_id else "")
        if item.tags:
            settings["tags"] = ", ".join(f"{k}={v}" for k, v in item.tags.items())
    return Endpoint(kind, item.name, item.url, settings)


async def check_online(config: Config, report: ConfigReport) -> None:
    """Reach every source and target of ``config`` and try what replicator needs of each;
    the checks are added to ``report``, sources and targets checked concurrently."""
    report.online = True
    results = await asyncio.gather(
        *(_check_source(s) for s in config.sources), *(_check_target(t) for t in config.targets)
    )
    report.checks = [check for checks in results for check in checks]


# -- sources ----------------------------------------------------------------------------------


async def _check_source(cfg: SourceConfig) -> list[Check]:
    subject = f"source {cfg.name}"
    if isinstance(cfg, S3SourceConfig):
        return await asyncio.to_thread(_probe_s3_source, cfg, subject)
    if isinstance(cfg, PosixSourceConfig):
        return await asyncio.to_thread(_probe_directory, cfg.path, subject)
    return await _probe_any_source(cfg, subject)


def _probe_directory(root: Path, subject: str) -> list[Check]:
    """List the directory; read one byte of the first file met (walking down, not the whole
    tree: a dataset may hold millions of files)."""
    try:
        with os.scandir(root) as entries:
            first = [e for _, e in zip(range(1000), entries, strict=False)]
    except OSError as exc:
        return [Check(subject, "list", False, f"{root}: {exc.strerror or exc}")]
    checks = [Check(subject, "list", True)]
    found = _first_file(first)
    if found is None:
        return [*checks, Check(subject, "read", True, "no file to read yet")]
    try:
        with open(found, "rb") as f:
            f.read(1)
    except OSError as exc:
        return [*checks, Check(subject, "read", False, f"{found}: {exc.strerror or exc}")]
    return [*checks, Check(subject, "read", True)]


def _first_file(entries: list[os.DirEntry[str]], depth: int = 0) -> Path | None:
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            if entry.is_file(follow_symlinks=False):
                return Path(entry.path)
        except OSError:
            continue
    if depth >= 8:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            with os.scandir(entry.path) as inner:
                found = _first_file(list(inner), depth + 1)
        except OSError:
            continue
        if found is not None:
            return found
    return None


def _probe_s3_source(cfg: S3SourceConfig, subject: str) -> list[Check]:
    """One page of one key of the listing, and one byte of that object."""
    from replicator.s3.errors import SDK_ERRORS, convert_error
    from replicator.sources.s3 import S3Source

    try:
        source = S3Source(cfg.name, cfg.s3_location, cfg, cfg.path_filter())
    except ReplicatorError as exc:
        return [Check(subject, "list", False, str(exc))]
    loc = cfg.s3_location
    try:
        try:
            page = source.client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.prefix, MaxKeys=1)
        except SDK_ERRORS as exc:
            return [
                _failed(subject, "list", convert_error(exc, target=cfg.name, operation="list", key=cfg.url))
            ]
        checks = [Check(subject, "list", True)]
        contents = page.get("Contents", [])
        if not contents:
            return [*checks, Check(subject, "read", True, "no object to read yet")]
        key = contents[0]["Key"]
        try:
            resp = source.client.get_object(Bucket=loc.bucket, Key=key, Range="bytes=0-0")
            resp["Body"].read()
            resp["Body"].close()
        except SDK_ERRORS as exc:
            return [
                *checks,
                _failed(subject, "read", convert_error(exc, target=cfg.name, operation="get", key=key)),
            ]
        return [*checks, Check(subject, "read", True)]
    finally:
        source.client.close()


async def _probe_any_source(cfg: SourceConfig, subject: str) -> list[Check]:
    """A source of another backend: through the Source protocol (a full scan)."""
    from replicator.sources import open_source

    try:
        source = open_source(cfg)
    except ReplicatorError as exc:
        return [_failed(subject, "list", exc)]
    try:
        try:
            listing = await source.scan()
        except ReplicatorError as exc:
            return [_failed(subject, "list", exc)]
        checks = [Check(subject, "list", True)]
        if not listing.files:
            return [*checks, Check(subject, "read", True, "no file to read yet")]
        try:
            handle = source.open(listing.files[0])
            handle.readinto(memoryview(bytearray(1)))
            handle.close()
        except (ReplicatorError, OSError) as exc:
            return [*checks, _failed(subject, "read", exc)]
        return [*checks, Check(subject, "read", True)]
    finally:
        await source.close()


# -- targets ----------------------------------------------------------------------------------


async def _check_target(cfg: TargetConfig) -> list[Check]:
    """Put, get, list and delete a scratch object, through the target's usual wrappers (its
    retries give up after ``retry.command_give_up_after``)."""
    from replicator.targets import open_target

    subject = f"target {cfg.name}"
    try:
        target = await open_target(cfg)
    except ReplicatorError as exc:
        return [_failed(subject, "connect", exc)]
    key = f"{SCRATCH_PREFIX}config-check-{secrets.token_hex(8)}"
    body = b"replicator config check\n"
    checks: list[Check] = []

    async def attempt(name: str, step: Callable[[], Awaitable[object]]) -> bool:
        try:
            await step()
        except ReplicatorError as exc:
            checks.append(_failed(subject, name, exc))
            return False
        checks.append(Check(subject, name, True))
        return True

    async def get() -> None:
        data = await target.get(key)
        if data != body:
            raise ReplicatorError(f"read back {len(data)} bytes that differ from the {len(body)} written")

    async def listed() -> None:
        found = [info.key async for info in target.list(SCRATCH_PREFIX)]
        if key not in found:
            raise ReplicatorError(f"the listing of {SCRATCH_PREFIX} does not show {key}")

    try:
        if await attempt("put", lambda: target.put(key, body)):
            await attempt("get", get)
            await attempt("list", listed)
            await attempt("delete", lambda: target.delete(key))
            if isinstance(cfg, S3TargetConfig):
                checks.append(Check(subject, "checksum", True, _checksum_in_use(target)))
        else:
            await attempt("list", _lists(target))
    finally:
        await target.close()
    return checks


def _checksum_in_use(target: Any) -> str:
    """What an S3 target's PUTs carry, once one PUT has gone through."""
    from replicator.targets import backend_of
    from replicator.targets.s3 import S3Target

    backend = backend_of(target)
    assert isinstance(backend, S3Target)
    if backend.detected is not None:
        return backend.detected.describe()
    return f"{backend.checksum}, as configured"


def _lists(target: Any) -> Callable[[], Awaitable[object]]:
    """A listing of the scratch prefix, when nothing could be written there."""

    async def step() -> None:
        async for _ in target.list(SCRATCH_PREFIX):
            break

    return step


def _failed(subject: str, check: str, exc: BaseException) -> Check:
    return Check(subject, check, False, str(exc), unreachable=isinstance(exc, TargetUnreachableError))
