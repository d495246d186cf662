"""Egress budgets: ledger, pacing, priorities, soft and hard modes, plan accuracy, SIGHUP."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from replicator.budget import GLOBAL, Budget, Ledger
from replicator.config import Config
from replicator.engine import Replicator, SourceResult
from replicator.plan import make_plan
from replicator.state import StateStore
from replicator.sync import sync_source
from tests.conftest import cli, write_config
from tests.daemon_helpers import DaemonProcess, latest_manifest, wait_until
from tests.helpers import config_dict, make_checkpoint
from tests.test_rpo import metric

GIB = 1 << 30


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def budget_config(**target_budget: Any) -> Config:
    return Config.model_validate(
        {
            "targets": [
                {"name": "t", "url": "/x", "cost": {"egress_usd_per_gib": 1.0}, "budget": target_budget}
            ],
            "sources": [{"name": "s", "url": "/y"}],
        }
    )


def spend(ledger: Ledger, gib: float) -> None:
    ledger.record("t", "put", int(gib * GIB))


def test_monthly_budget_is_paced_so_day_one_cannot_starve_day_twenty(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 1, 9, tzinfo=UTC))  # November: 30 days
    state = StateStore.open(tmp_path)
    ledger = Ledger(state, ["t"], clock)
    budget = Budget(budget_config(usd_per_month=30.0), ledger, clock)
    a = budget.allowance("t")
    assert a is not None and a.today == pytest.approx(1.0)  # $30 over 30 days
    spend(ledger, 1.0)
    assert not budget.allows("t", "high", 0.01)  # day 1's share is spent, however big the burst
    clock.now = datetime(2026, 11, 20, 9, tzinfo=UTC)
    a = budget.allowance("t")
    assert a is not None and a.today == pytest.approx(29.0 / 11)  # unused days carried forward
    assert budget.allows("t", "normal", 2.0)
    state.close()


def test_priorities_are_deferred_lowest_first(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 22, 12, tzinfo=UTC))
    state = StateStore.open(tmp_path)
    ledger = Ledger(state, ["t"], clock)
    budget = Budget(budget_config(usd_per_day=10.0, mode="hard"), ledger, clock)
    spend(ledger, 7.5)  # 75 % of today's $10
    assert not budget.allows("t", "low", 0.0)
    assert budget.allows("t", "normal", 0.0) and budget.allows("t", "high", 0.0)
    spend(ledger, 1.5)  # 90 %
    assert not budget.allows("t", "normal", 0.0)
    assert budget.allows("t", "critical", 0.5) and not budget.allows("t", "critical", 1.5)
    # Soft mode: critical keeps flowing past the budget; everything else still stops.
    soft = Budget(budget_config(usd_per_day=10.0, mode="soft"), ledger, clock)
    spend(ledger, 5.0)
    assert soft.allows("t", "critical", 1.0) and not soft.allows("t", "high", 0.0)
    # A new UTC day starts a new allowance.
    clock.now += timedelta(days=1)
    assert budget.allows("t", "low", 1.0)
    state.close()


def test_admission_reserves_until_the_request_is_recorded(tmp_path: Path) -> None:
    """Senders reserve before sending: concurrent uploads cannot all pass the check before
    any is counted, and a request the meter has recorded is not counted twice."""
    clock = Clock(datetime(2026, 11, 22, 12, tzinfo=UTC))
    state = StateStore.open(tmp_path)
    budget = Budget(budget_config(usd_per_day=4.0, mode="hard"), Ledger(state, ["t"], clock), clock)
    sender = budget.for_target("t")
    first = sender.reserve("critical", 3 * GIB)  # $3 of $4
    assert first is not None
    assert sender.reserve("critical", 2 * GIB) is None  # would pass on recorded spend alone
    budget.record("t", "put", 3 * GIB)  # the meter saw the first request: not counted twice
    part = 3 * GIB // 4
    assert sender.allows("critical", part)
    second = sender.reserve("critical", part)  # $3.75 of $4
    assert second is not None and sender.reserve("critical", part) is None
    second.release()  # abandoned, never sent
    assert sender.reserve("critical", part) is not None  # room again
    first.release()  # releasing a consumed reservation changes nothing
    assert sender.reserve("critical", GIB) is None
    state.close()


def test_ledger_is_exact_and_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 22, 12, tzinfo=UTC))
    state = StateStore.open(tmp_path)
    ledger = Ledger(state, ["t"], clock)
    for _ in range(1000):
        ledger.record("t", "put", 1234)
    ledger.record("t", "get")
    ledger.record("t", "list")
    ledger.flush()
    state.close()
    state = StateStore.open(tmp_path)
    again = Ledger(state, ["t"], clock)
    usage = again.usage("t", clock.now.date(), clock.now.date())
    assert (usage.bytes, usage.puts, usage.gets) == (1_234_000, 1001, 1)
    budget = Budget(budget_config(usd_per_day=1.0), again, clock)
    assert budget.spent(GLOBAL, clock.now.date(), clock.now.date()) == pytest.approx(1_234_000 / GIB)
    state.close()


def two_source_config(tmp_path: Path, **budget: Any) -> dict[str, Any]:
    ckpt, data, target = tmp_path / "ckpt", tmp_path / "data", tmp_path / "target"
    make_checkpoint(ckpt, 1, hidden=768)  # ~6 MiB stored: $6, past the day's $4
    make_checkpoint(data, 2, marker=None)  # ~0.7 MiB stored: fits a fresh day
    target.mkdir()
    sources: list[dict[str, Any]] = [
        {"name": "ckpt", "url": str(ckpt), "kind": "checkpoint", "complete_when": {"marker": "COMPLETE"}},
        {"name": "data", "url": str(data), "kind": "dataset", "priority": "low"},
    ]
    # $1 per MiB uploaded: a budget of a few dollars is a few MiB.
    t: dict[str, Any] = {
        "name": "t",
        "url": str(target),
        "concurrency": 1,
        "cost": {"egress_usd_per_gib": 1024.0},
    }
    t["budget"] = {"usd_per_day": 4.0, **budget}
    return config_dict(tmp_path, sources, [t])


async def one_pass(config: Config, clock: Clock) -> dict[str, SourceResult]:
    async with Replicator(config, clock=clock) as rep:
        await rep.attach_all()
        return {s.name: await sync_source(rep, s) for s in config.sources}


def test_soft_budget_defers_low_priority_and_resumes_next_day(tmp_path: Path) -> None:
    config = Config.model_validate(two_source_config(tmp_path, mode="soft"))
    clock = Clock(datetime(2026, 11, 22, 12, tzinfo=UTC))
    results = asyncio.run(one_pass(config, clock))
    assert results["ckpt"].targets[0].status == "published"  # critical flows past the budget
    assert results["data"].targets[0].status == "deferred"
    assert results["data"].targets[0].uploads.chunks_deferred > 0  # (a tiny chunk may still fit)
    t = {"name": "t", "url": str(tmp_path / "target")}
    assert latest_manifest(t, "data") is None

    results = asyncio.run(one_pass(config, clock))  # the same day: still deferred, never dropped
    assert results["data"].targets[0].status == "deferred"
    clock.now += timedelta(days=1)
    results = asyncio.run(one_pass(config, clock))  # a new period
    assert results["data"].targets[0].status == "published"
    assert latest_manifest(t, "data") is not None


def test_hard_budget_stops_everything_at_the_budget(tmp_path: Path) -> None:
    config = Config.model_validate(two_source_config(tmp_path, mode="hard"))
    clock = Clock(datetime(2026, 11, 22, 12, tzinfo=UTC))
    results = asyncio.run(one_pass(config, clock))
    assert {r.targets[0].status for r in results.values()} == {"deferred"}
    sent = sum(r.targets[0].uploads.bytes_sent for r in results.values())
    assert sent > 0
    state = StateStore.open(config.state_dir)
    usage = Ledger(state, ["t"], clock).usage("t", clock.now.date(), clock.now.date())
    state.close()
    assert usage.bytes / GIB * 1024.0 <= 4.0  # the ledger never went past the $4 budget


def test_plan_is_within_five_percent_of_the_following_sync(tmp_path: Path) -> None:
    data = two_source_config(tmp_path)
    for t in data["targets"]:
        t.pop("budget")
        t["cost"] = {"egress_usd_per_gib": 0.09, "put_usd_per_1k": 0.005, "get_usd_per_1k": 0.0004}
    make_checkpoint(tmp_path / "ckpt", 3, hidden=512)
    (tmp_path / "data" / "notes.jsonl").write_text('{"a": 1}\n' * 20000)
    config = Config.model_validate(data)
    plan = asyncio.run(make_plan(config))
    planned = plan.targets[0]
    assert planned.bytes > 1 << 20
    cfg = write_config(tmp_path / "r.yaml", data)
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    state = StateStore.open(config.state_dir)
    today = datetime.now(UTC).date()
    usage = Ledger(state, ["t"]).usage("t", today, today)
    state.close()
    actual_cost = usage.usd(config.targets[0].cost)
    assert abs(planned.bytes - usage.bytes) <= 0.05 * usage.bytes, (planned.bytes, usage.bytes)
    assert abs(planned.cost_usd - actual_cost) <= 0.05 * actual_cost, (planned.cost_usd, actual_cost)
    assert abs(planned.puts - usage.puts) <= max(1, 0.05 * usage.puts)
    # And the plan of an up-to-date source is nothing to send.
    again = asyncio.run(make_plan(config))
    assert again.targets[0].bytes == 0 and again.files_read == 0
    out = cli("plan", "-c", str(cfg), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["targets"][0]["bytes"] == 0


def test_sighup_with_a_raised_budget_resumes_deferred_work(tmp_path: Path) -> None:
    data = two_source_config(tmp_path, mode="hard")
    data["sources"] = data["sources"][1:]  # the low-priority dataset only
    data["targets"][0]["budget"]["usd_per_day"] = 0.01
    cfg = write_config(tmp_path / "r.yaml", data)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    t = {"name": "t", "url": str(tmp_path / "target")}
    try:
        wait_until(lambda: "snapshot.deferred" in daemon.log_text(), what="deferral")
        assert _deferred(cfg)
        assert latest_manifest(t, "data") is None
        data["targets"][0]["budget"]["usd_per_day"] = 100.0
        cfg.write_text(yaml.safe_dump(data))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: latest_manifest(t, "data"), timeout=60, what="published after SIGHUP")
        assert "config.reloaded" in daemon.log_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_sighup_priority_reaches_the_chunks_of_the_next_candidate(tmp_path: Path) -> None:
    """A SIGHUP that raises a source's priority applies to the chunks its worker offers next,
    not only to the publish (a copy of the config kept by the worker once admitted them at the
    old priority: deferred, then read a second time by the publisher's catch-up)."""
    data = two_source_config(tmp_path, mode="hard")
    data["sources"] = data["sources"][1:]  # the dataset: ~0.7 MiB stored, $1 per MiB
    data["targets"][0]["budget"]["usd_per_day"] = 0.9  # low may spend 70 %: $0.63; critical all
    cfg = write_config(tmp_path / "r.yaml", data)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    t = {"name": "t", "url": str(tmp_path / "target")}
    listen = data["listen"]
    try:
        wait_until(lambda: "snapshot.deferred" in daemon.log_text(), what="deferral at low priority")
        data["sources"][0]["priority"] = "critical"
        cfg.write_text(yaml.safe_dump(data))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: latest_manifest(t, "data"), timeout=60, what="published after SIGHUP")
        before = metric(listen, "replicator_read_bytes_total", source="data")
        assert before is not None
        fresh = tmp_path / "data" / "fresh.bin"
        fresh.write_bytes(np.random.default_rng(7).bytes(100_000))  # $0.1: fits at critical only
        wait_until(lambda: _has(t, "fresh.bin"), timeout=60, what="the next candidate")
        after = metric(listen, "replicator_read_bytes_total", source="data")
        assert after == before + fresh.stat().st_size, "the fresh file was read twice (admitted at low)"
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def _has(target: dict[str, Any], path: str) -> bool:
    m = latest_manifest(target, "data")
    return m is not None and any(f.path == path for f in m.files)


def _deferred(cfg: Path) -> bool:
    res = cli("status", "-c", str(cfg), "--json")
    return res.returncode in (0, 1) and any(p["deferred"] for p in json.loads(res.stdout)["pairs"])
