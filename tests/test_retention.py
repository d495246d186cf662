"""Retention policies (replicator.retention.policy): restic's rules, checkpoint sets, and the
properties that make retention safe. Pure functions on plain data: no clock, no target."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.config import parse_config
from replicator.errors import ConfigError
from replicator.retention.policy import (
    Item,
    RetentionPolicy,
    Summary,
    plan_sets,
    plan_snapshots,
    select,
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def sid(when: datetime, n: int = 0) -> str:
    """A well-formed snapshot id created at ``when``."""
    return f"{when.strftime('%Y%m%dT%H%M%S.%fZ')}-{n:032x}"


def ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000


def policy(**rules: Any) -> RetentionPolicy:
    return RetentionPolicy.model_validate(rules)


# -- restic's rules ---------------------------------------------------------------------------


def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days_that_have_one() -> None:
    # The restic forum's example: nothing on May 3rd, two on May 2nd.
    items = [
        Item("a1", at("2026-05-01T08:00")),
        Item("a2", at("2026-05-02T08:00")),
        Item("a3", at("2026-05-02T11:00")),
        Item("a4", at("2026-05-04T09:00")),
        Item("a5", at("2026-05-05T10:00")),
    ]
    kept = select(items, policy(keep_daily=4))
    assert kept == {
        "a5": ["daily 2026-05-05"],
        "a4": ["daily 2026-05-04"],
        "a3": ["daily 2026-05-02"],
        "a1": ["daily 2026-05-01"],
    }
    assert set(select(items, policy(keep_daily=2))) == {"a5", "a4"}


def test_buckets_are_utc_calendar_periods_and_iso_weeks() -> None:
    items = [
        Item("sun", at("2026-12-06T23:59")),  # Sunday: ISO week 49
        Item("mon", at("2026-12-07T00:01")),  # Monday: week 50
        Item("nye", at("2026-12-31T12:00")),  # Thursday: ISO week 53 of 2026
        Item("jan", at("2027-01-03T12:00")),  # Sunday: still ISO week 2026-W53
        Item("h1", at("2027-01-04T10:59")),
        Item("h2", at("2027-01-04T10:01")),
    ]
    assert select(items, policy(keep_weekly=3)) == {
        "h1": ["weekly 2027-W01"],
        "jan": ["weekly 2026-W53"],
        "mon": ["weekly 2026-W50"],
    }
    hourly = {"h1": ["hourly 2027-01-04T10"], "jan": ["hourly 2027-01-03T12"]}
    assert select(items, policy(keep_hourly=2)) == hourly
    assert select(items, policy(keep_monthly=2)) == {"h1": ["monthly 2027-01"], "nye": ["monthly 2026-12"]}
    assert select(items, policy(keep_yearly=5)) == {"h1": ["yearly 2027"], "nye": ["yearly 2026"]}


def test_keep_within_counts_back_from_the_newest_item_not_from_now() -> None:
    newest = at("2026-01-10T00:00")
    items = [Item(f"d{d}", newest - timedelta(days=d)) for d in range(10)]
    # However long ago the newest is, its last 3 days stay: a stopped source keeps its history.
    assert select(items, policy(keep_within="3d")) == {f"d{d}": ["within 3d"] for d in range(4)}


def test_rules_are_a_union_and_every_reason_is_given() -> None:
    day = at("2026-12-01T12:00")
    items = [Item(f"s{d}", day + timedelta(days=d)) for d in range(6)]
    kept = select(items, policy(keep_last=2, keep_daily=3, keep_within="1d"))
    assert kept == {
        "s5": ["last 2", "within 1d", "daily 2026-12-06"],
        "s4": ["last 2", "within 1d", "daily 2026-12-05"],
        "s3": ["daily 2026-12-04"],
    }


def test_an_empty_policy_keeps_everything() -> None:
    ids = [sid(at("2026-12-01T00:00"), n) for n in range(3)]
    result = plan_snapshots(ids, ids[-1], RetentionPolicy())
    assert result.drop == [] and all(v.reasons == ["no policy"] for v in result.snapshots)


def test_datasets_count_snapshots_and_the_latest_is_always_kept() -> None:
    ids = [sid(at("2026-12-01T00:00") + timedelta(hours=h), h) for h in range(5)]
    # The ref may name an older snapshot than the newest listed (a publish in progress).
    result = plan_snapshots(ids, ids[1], policy(keep_last=2))
    assert result.keep == [ids[1], ids[3], ids[4]]
    assert result.snapshots[1].reasons == ["latest"]
    assert result.snapshots[4].reasons == ["last 2"]
    with pytest.raises(ValueError, match="not among"):
        plan_snapshots(ids[:-1], ids[-1], policy(keep_last=2))


# -- checkpoint sets --------------------------------------------------------------------------

T0 = at("2026-12-01T00:00")


def history(steps: list[int], window: int = 2) -> tuple[list[str], dict[str, Summary]]:
    """A trainer that writes set ``step-N`` at hour N and keeps ``window`` sets on disk; one
    snapshot per new set, each holding the sets then on disk."""
    ids: list[str] = []
    summaries: dict[str, Summary] = {}
    for i, step in enumerate(steps):
        snap = sid(T0 + timedelta(hours=step), i)
        ids.append(snap)
        on_disk = steps[max(0, i - window + 1) : i + 1]
        summaries[snap] = {f"step-{s}": ns(T0 + timedelta(hours=s)) for s in on_disk}
    return ids, summaries


def test_checkpoint_policies_count_sets_and_keep_each_in_its_newest_holder() -> None:
    ids, summaries = history([1, 2, 3, 4, 5, 6])
    result = plan_sets(ids, ids[-1], summaries, policy(keep_last=3))
    # Sets 6 and 5 are in the latest; set 4's newest holder is the snapshot of step 5.
    assert result.keep == [ids[4], ids[5]]
    reasons = {v.snapshot: v.reasons for v in result.snapshots}
    assert reasons[ids[5]] == ["latest", "holds kept set step-6", "holds kept set step-5"]
    assert reasons[ids[4]] == ["holds kept set step-4"]
    sets = {s.name: s for s in result.sets}
    assert [s.name for s in result.sets] == [f"step-{n}" for n in (6, 5, 4, 3, 2, 1)]
    assert sets["step-6"].reasons == ["in latest", "last 3"] and sets["step-6"].keep
    assert sets["step-4"].reasons == ["last 3"] and sets["step-4"].holder == ids[4]
    assert not any(sets[f"step-{n}"].keep or sets[f"step-{n}"].reasons for n in (1, 2, 3))


def test_a_set_no_rule_chose_is_reported_kept_while_a_kept_snapshot_holds_it() -> None:
    ids, summaries = history([1, 2, 3, 4, 5, 6])
    # The ref names the snapshot of step 5 (holding sets 4 and 5); step 6's holds sets 5 and 6.
    result = plan_sets(ids, ids[4], summaries, policy(keep_last=1))
    assert result.keep == [ids[4], ids[5]]
    sets = {s.name: s for s in result.sets}
    assert sets["step-6"].reasons == ["last 1"]
    assert sets["step-5"].keep and sets["step-5"].reasons == [f"also in kept snapshot {ids[5]}"]
    assert sets["step-4"].keep and sets["step-4"].reasons == ["in latest"]
    assert not sets["step-3"].keep


def test_keep_sets_milestones_survive_forever() -> None:
    steps = [500, 1000, 1500, 2000, 2500, 3000]
    ids, summaries = history(steps, window=1)
    result = plan_sets(ids, ids[-1], summaries, policy(keep_last=1, keep_sets=["step-*000"]))
    assert result.keep == [ids[1], ids[3], ids[5]]
    assert {v.snapshot: v.reasons for v in result.snapshots if v.keep} == {
        ids[1]: ["holds kept set step-1000"],
        ids[3]: ["holds kept set step-2000"],
        ids[5]: ["latest", "holds kept set step-3000"],
    }
    assert {s.name: s.reasons for s in result.sets if s.keep}["step-1000"] == ["keep_sets step-*000"]


def test_an_unreadable_manifest_is_kept_and_says_so() -> None:
    ids, summaries = history([1, 2, 3, 4], window=1)
    summaries[ids[0]] = None
    result = plan_sets(ids, ids[-1], summaries, policy(keep_last=1))
    assert result.keep == [ids[0], ids[3]]
    assert result.snapshots[0].reasons == ["unreadable: kept"] and result.snapshots[0].sets is None


def test_set_time_is_its_newest_files_and_daily_counts_days_of_training() -> None:
    # Four sets on Dec 1, one on Dec 3; the snapshots were all taken on Dec 5 (a catch-up).
    times = [at("2026-12-01T01:00"), at("2026-12-01T05:00"), at("2026-12-01T09:00"), at("2026-12-03T09:00")]
    ids = [sid(at("2026-12-05T00:00") + timedelta(minutes=i), i) for i in range(4)]
    summaries: dict[str, Summary] = {
        s: {f"step-{i}": ns(t)} for i, (s, t) in enumerate(zip(ids, times, strict=True))
    }
    result = plan_sets(ids, ids[-1], summaries, policy(keep_daily=7))
    assert result.keep == [ids[2], ids[3]]
    assert result.snapshots[2].reasons == ["holds kept set step-2"]
    assert {s.name: s.reasons for s in result.sets}["step-2"] == ["daily 2026-12-01"]


def test_keep_last_on_sets_is_the_rule_of_before_policies() -> None:
    """``keep_last: N`` (top level, as configs wrote it) keeps what it always kept: the N
    newest sets among all snapshots, the latest, and every unreadable manifest."""
    ids, summaries = history([1, 2, 3, 4, 5, 6, 7, 8], window=3)
    for n in range(1, 9):
        result = plan_sets(ids, ids[-1], summaries, policy(keep_last=n))
        newest_sets = [f"step-{s}" for s in range(8, 8 - n, -1)]
        holders = {max(i for i in ids if name in (summaries[i] or {})) for name in newest_sets}
        assert set(result.keep) == {ids[-1]} | holders


def test_absurd_times_in_an_untrusted_manifest_do_not_break_the_plan() -> None:
    ids = [sid(T0, 0), sid(T0 + timedelta(hours=1), 1)]
    summaries: dict[str, Summary] = {ids[0]: {"future": 10**30, "past": -(10**30)}, ids[1]: {"now": ns(T0)}}
    result = plan_sets(ids, ids[1], summaries, policy(keep_last=1, keep_within="99999999d", keep_yearly=3))
    assert {s.name for s in result.sets if s.keep} == {"future", "past", "now"}
    assert result.drop == []


def test_a_policy_describes_itself() -> None:
    assert RetentionPolicy().describe() == "keep everything"
    rules = policy(keep_sets=["step-*000", "best-*"], keep_within="7d", keep_last=3)
    assert rules.describe() == "keep_last 3, keep_within 7d, keep_sets step-*000, keep_sets best-*"


# -- properties -------------------------------------------------------------------------------

POLICIES = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 5),
    keep_within=st.none() | st.sampled_from(["1h", "1d", "3d"]),
    keep_hourly=st.none() | st.integers(1, 4),
    keep_daily=st.none() | st.integers(1, 4),
    keep_weekly=st.none() | st.integers(1, 3),
    keep_monthly=st.none() | st.integers(1, 2),
    keep_yearly=st.none() | st.integers(1, 2),
    keep_sets=st.lists(st.sampled_from(["s-*0", "s-1?", "nothing"]), max_size=2),
)


@st.composite
def repositories(draw: st.DrawFn) -> tuple[list[str], str, dict[str, Summary]]:
    """Snapshots (oldest first) of arbitrary sets at arbitrary times (hours to weeks apart),
    some unreadable, and a latest among them."""
    n = draw(st.integers(1, 12))
    gaps = draw(st.lists(st.integers(1, 24 * 40), min_size=n, max_size=n))
    ids: list[str] = []
    summaries: dict[str, Summary] = {}
    when = T0
    names = [f"s-{i}" for i in range(16)]
    for i, gap in enumerate(gaps):
        when += timedelta(hours=gap)
        snap = sid(when, i)
        ids.append(snap)
        held = draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
        offsets = draw(st.lists(st.integers(-24 * 30, 0), min_size=len(held), max_size=len(held)))
        summaries[snap] = {name: ns(when + timedelta(hours=o)) for name, o in zip(held, offsets, strict=True)}
        if draw(st.integers(0, 9)) == 0:
            summaries[snap] = None
    latest = draw(st.sampled_from(ids))
    return ids, latest, summaries


def after_deleting(
    ids: list[str], summaries: Mapping[str, Summary], drop: list[str]
) -> tuple[list[str], dict[str, Summary]]:
    left = [s for s in ids if s not in drop]
    return left, {s: summaries[s] for s in left}


@settings(max_examples=300, deadline=None)
@given(repositories(), POLICIES)
def test_a_kept_set_is_never_lost_and_the_latest_always_stays(
    repo: tuple[list[str], str, dict[str, Summary]], rules: RetentionPolicy
) -> None:
    ids, latest, summaries = repo
    result = plan_sets(ids, latest, summaries, rules)
    kept = set(result.keep)
    assert latest in kept
    assert all(s in kept for s in ids if summaries[s] is None), "an unreadable manifest was dropped"
    held_after = {name for s in kept for name in (summaries[s] or {})}
    for verdict in result.sets:
        if verdict.reasons and verdict.reasons != ["no policy"]:
            assert verdict.keep, f"{verdict.name} is kept by {verdict.reasons} but no kept manifest holds it"
        # The report is true: a set is "kept" exactly when a kept manifest still holds it.
        assert verdict.keep == (verdict.name in held_after)
    for snap in result.snapshots:
        assert snap.keep == bool(snap.reasons), "every kept snapshot says why, no dropped one does"


@settings(max_examples=300, deadline=None)
@given(repositories(), POLICIES)
def test_forgetting_twice_drops_nothing_more(
    repo: tuple[list[str], str, dict[str, Summary]], rules: RetentionPolicy
) -> None:
    ids, latest, summaries = repo
    first = plan_sets(ids, latest, summaries, rules)
    left, left_summaries = after_deleting(ids, summaries, first.drop)
    again = plan_sets(left, latest, left_summaries, rules)
    assert again.drop == []
    assert {s.name for s in again.sets} == {s.name for s in first.sets if s.keep}
    # Datasets too: the policy over what is left keeps all of it.
    snaps = plan_snapshots(ids, latest, rules.model_copy(update={"keep_sets": []}))
    assert latest in snaps.keep
    assert plan_snapshots(snaps.keep, latest, snaps.policy).drop == []


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=30), POLICIES)
def test_selection_does_not_depend_on_input_order(minutes: list[int], rules: RetentionPolicy) -> None:
    items = [Item(f"s-{i}", T0 + timedelta(minutes=m)) for i, m in enumerate(minutes)]
    assert select(items, rules) == select(list(reversed(items)), rules)


# -- configuration ----------------------------------------------------------------------------


def config(tmp_path: Path, **source: Any) -> dict[str, Any]:
    return {
        "state_dir": str(tmp_path / "state"),
        "sources": [{"name": "ckpt", "url": str(tmp_path / "src"), "kind": "checkpoint", **source}],
        "targets": [{"name": n, "url": str(tmp_path / n)} for n in ("hot", "cold")],
    }


def test_config_policy_per_source_with_per_target_overrides(tmp_path: Path) -> None:
    cfg = parse_config(
        config(
            tmp_path,
            retention={"keep_last": 3, "keep_daily": 7, "keep_sets": ["step-*000"]},
            retention_overrides={"cold": {"keep_monthly": 24}},
        ),
        tmp_path,
    )
    source = cfg.source("ckpt")
    assert source.retention_for("hot") == policy(keep_last=3, keep_daily=7, keep_sets=["step-*000"])
    assert source.retention_for("cold") == policy(keep_monthly=24)


def test_config_top_level_keep_last_still_works(tmp_path: Path) -> None:
    source = parse_config(config(tmp_path, keep_last=5), tmp_path).source("ckpt")
    assert source.retention_for("hot") == policy(keep_last=5)
    assert parse_config(config(tmp_path), tmp_path).source("ckpt").retention_for("hot").is_empty


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"keep_last": 3, "retention": {"keep_daily": 7}}, "give keep_last inside retention"),
        ({"retention_overrides": {"nowhere": {"keep_last": 1}}}, "unknown target 'nowhere'"),
        ({"kind": "dataset", "retention": {"keep_sets": ["x"]}}, "keep_sets applies to kind: checkpoint"),
        ({"retention": {"keep_within": "a week"}}, "invalid duration"),
        ({"retention": {"keep_daily": 0}}, "greater than or equal to 1"),
        ({"retention": {"keep_dayly": 7}}, "keep_dayly"),
    ],
)
def test_config_refuses_bad_retention(tmp_path: Path, source: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config(tmp_path, **source), tmp_path)


def test_a_set_dated_anew_after_a_drop_does_not_make_a_second_forget_drop_more() -> None:
    """Found by the forget-twice property: set s-2's newest version (2027) is in a snapshot the
    yearly rule drops; its older version (31 December 2026) stays in the latest snapshot, and
    then wins 2026's period from s-0. Planning again on what is left, until nothing more is
    dropped, makes the first forget the last."""
    hour = 3_600_000_000_000
    new_year = 1_798_761_600_000_000_000  # 2027-01-01T00:00Z
    ids = [f"2026120{1}T010000.000000Z-{0:032x}"] + [
        f"20270101T{h:02d}0000.000000Z-{h + 1:032x}" for h in range(3)
    ]
    old, latest, second, third = ids
    summaries: dict[str, Summary] = {
        old: {"s-0": new_year - 31 * 24 * hour},
        latest: {"s-2": new_year - hour, "s-1": new_year},
        second: {"s-2": new_year + hour},
        third: {"s-1": new_year + 4 * hour},
    }
    rules = RetentionPolicy(keep_yearly=2)
    first = plan_sets(ids, latest, summaries, rules)
    left, left_summaries = after_deleting(ids, summaries, first.drop)
    assert plan_sets(left, latest, left_summaries, rules).drop == []
    assert set(first.drop) == {second, old}, "what a second run would drop is dropped at once"
