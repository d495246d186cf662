"""Shared fixtures: real S3 servers, target factories for the conformance suite, CLI runner, and the
fault harness (tests/faults.py): ``memory_targets`` and ``fault_proxy``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faults import FaultProxy, MemoryStore, MemoryTargets
from tests.servers import MotoServer, RcloneServer, S3Server, isolate_aws_environment

isolate_aws_environment()

TARGET_KINDS = ["posix", "rclone", "moto"]
"""Target kinds any test can use, in-process or through a ``replicator`` subprocess. The
conformance suite adds ``memory`` (tests/faults.py), which exists in the test process only."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A required test that is skipped is a failure, not a pass (DESIGN.md, Tests)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and item.get_closest_marker("optional") is None:
        report.outcome = "failed"
        report.longrepr = f"required test was skipped: {report.longrepr}"


@pytest.fixture(scope="session")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneServer]:
    server = RcloneServer(tmp_path_factory.mktemp("rclone-root")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@dataclass
class TargetSpec:
    """How to reach a fresh, empty target of one kind: a config fragment plus a server handle."""

    kind: str
    config: dict[str, Any]
    server: S3Server | None = None
    bucket: str | None = None
    path: Path | None = None
    store: MemoryStore | None = None


@pytest.fixture(params=TARGET_KINDS)
def target_spec(request: pytest.FixtureRequest, tmp_path: Path) -> TargetSpec:
    return make_target_spec(request, request.param, tmp_path)


@pytest.fixture(params=["rclone", "moto"])
def s3_target_spec(request: pytest.FixtureRequest, tmp_path: Path) -> TargetSpec:
    return make_target_spec(request, request.param, tmp_path)


def make_target_spec(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path, name: str = "t1"
) -> TargetSpec:
    if kind == "posix":
        path = tmp_path / f"target-{name}"
        path.mkdir()
        return TargetSpec(kind, {"name": name, "url": str(path)}, path=path)
    if kind == "memory":
        fake = request.getfixturevalue("memory_targets").add(name)
        return TargetSpec(kind, fake.config(), store=fake.store)
    server: S3Server = request.getfixturevalue(kind)
    bucket = server.new_bucket()
    cfg = {"name": name, "url": f"s3://{bucket}/replica", "endpoint_url": server.endpoint}
    return TargetSpec(kind, cfg, server=server, bucket=bucket)


@pytest.fixture
def memory_targets() -> Iterator[MemoryTargets]:
    """``memory://NAME`` and ``faulty://NAME`` target urls for this test (tests.faults.MemoryTargets)."""
    with MemoryTargets() as registry:
        yield registry


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[S3Server], FaultProxy]]:
    """A factory: ``fault_proxy(server)`` starts a FaultProxy in front of an S3 server; every
    proxy it made is closed after the test."""
    proxies: list[FaultProxy] = []

    def make(upstream: S3Server) -> FaultProxy:
        proxy = FaultProxy.for_server(upstream)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """log.configure (which every in-process command calls) changes process-wide state: put it
    back for the tests that follow."""
    import logging

    import structlog

    from replicator import log

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threshold, unapplied = log._threshold, log._unapplied_level
    yield
    root.handlers[:], root.level = handlers, level
    log._threshold, log._unapplied_level = threshold, unapplied
    log._generation += 1  # loggers made meanwhile are made again
    structlog.reset_defaults()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    as_unprivileged: bool = False,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m replicator`` as users do; never raises on a non-zero exit.

    ``as_unprivileged``: when the tests run as root, drop the capabilities that let root read
    any file, so that file permissions apply as they would to the service user."""
    full_env = {**os.environ, **(env or {})}
    prefix = (
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
        if as_unprivileged and os.geteuid() == 0
        else []
    )
    return subprocess.run(
        [*prefix, sys.executable, "-m", "replicator", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kw,
    )
