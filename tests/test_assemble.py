"""The assembler's rule (docs/FORMAT.md §11.3), on parts built in memory: when a set is complete,
and why it waits otherwise. The end-to-end stories are in tests/test_shared.py."""

from __future__ import annotations

from typing import Any

import pytest

from replicator.config import SharedConfig
from replicator.format.manifest import FileEntry, SetInfo
from replicator.format.parts import Member, MemberSet, Part, encode, parse_member, parse_part
from replicator.shared.assemble import assemble

CREATED = "2026-12-07T05:00:00.000000Z"


def entry(path: str, size: int = 10, digest: str = "a" * 32) -> FileEntry:
    return FileEntry(path=path, size=size, mode=0o644, mtime_ns=1, digest=digest, chunks=((digest, size),))


def part(
    instance: str,
    *files: FileEntry,
    instances: int = 3,
    index: int | None = None,
    name: str = "step-1",
    **kw: Any,
) -> Part:
    return Part(
        source="ckpt", instance=instance, instances=instances, index=index, created=CREATED,
        set=SetInfo(name=name, files=len(files), bytes=sum(f.size for f in files), newest_mtime_ns=5),
        files=files, **kw,
    )  # fmt: skip


def cfg(**kw: Any) -> SharedConfig:
    return SharedConfig(**{"instances": 3, "instance": "node-0", **kw})


def reasons(parts: list[Part], config: SharedConfig | None = None, marker: str | None = None) -> list[str]:
    out = assemble([(p, 100.0) for p in parts], {}, config or cfg(), marker, 130.0)
    return out.waiting["step-1"].reasons if "step-1" in out.waiting else []


def test_a_set_with_every_instances_part_is_complete() -> None:
    parts = [part(f"node-{i}", entry(f"step-1/__{i}_0.distcp", 10 + i, f"{i}" * 32)) for i in range(3)]
    out = assemble([(p, 100.0) for p in parts], {}, cfg(), None, 130.0)
    assert not out.waiting
    assert [s.name for s in out.sets] == ["step-1"] and out.sets[0].files == 3 and out.sets[0].bytes == 33
    assert [f.path for f in out.files] == [f"step-1/__{i}_0.distcp" for i in range(3)]


def test_a_missing_part_waits_and_says_whose_and_since_when() -> None:
    parts = [part(f"node-{i}", entry(f"step-1/f{i}")) for i in range(2)]
    members = {
        f"node-{i}": (Member(source="ckpt", instance=f"node-{i}", instances=3, created=CREATED), 125.0)
        for i in range(3)
    }
    out = assemble([(p, 100.0) for p in parts], members, cfg(), None, 130.0)
    w = out.waiting["step-1"]
    assert w.reasons == ["2 of 3 instances' parts are in"]
    assert (w.have, w.missing, w.age(130.0)) == (["node-0", "node-1"], ["node-2"], 30.0)
    assert not out.sets and not out.silent


def test_the_description_holds_a_set_whose_shard_is_missing_or_short() -> None:
    needs = {"step-1/__1_0.distcp": 100, "step-1/__2_0.distcp": 50}
    parts = [
        part("node-0", entry("step-1/.metadata"), needs=needs),
        part("node-1", entry("step-1/__1_0.distcp", 60)),
        part("node-2"),
    ]
    assert reasons(parts) == [
        "step-1/__1_0.distcp is 60 bytes in node-1's part; needs 100",
        "node-0's description names step-1/__2_0.distcp, which no part holds",
    ]


def test_conflicting_copies_and_a_missing_marker_hold_the_set() -> None:
    parts = [
        part("node-0", entry("step-1/config.json", digest="1" * 32)),
        part("node-1", entry("step-1/config.json", digest="2" * 32)),
        part("node-2"),
    ]
    assert reasons(parts, marker="COMPLETE") == [
        "step-1/config.json differs between node-0 and node-1",
        "no part holds the COMPLETE marker",
    ]


def test_parts_written_for_another_number_of_instances_never_complete_a_set() -> None:
    parts = [part(f"node-{i}", entry(f"step-1/f{i}"), instances=4) for i in range(3)]
    out = assemble([(p, 100.0) for p in parts], {}, cfg(), None, 130.0)
    assert out.waiting["step-1"].reasons == [
        "3 part(s) written for another number of instances than 3 (ignored)"
    ]
    fresh = [part(f"replicator-{i}", entry(f"step-1/f{i}"), index=i) for i in range(3)]
    stale = part("replicator-3", entry("step-1/f3"), instances=4, index=3)
    split = cfg(instance="replicator-0", split=True)
    out = assemble([(p, 100.0) for p in [*fresh, stale]], {}, split, None, 130.0)
    assert not out.waiting and out.sets[0].files == 3


def test_split_parts_must_each_hold_their_own_share() -> None:
    parts = [part(f"replicator-{i}", entry(f"step-1/f{i}"), index=0) for i in range(3)]
    assert "two parts claim the same share of the split (or none)" in reasons(
        parts, cfg(instance="replicator-0", split=True)
    )


def test_a_member_silent_for_three_heartbeats_is_reported() -> None:
    members = {
        "node-0": (Member(source="ckpt", instance="node-0", instances=3, created=CREATED), 129.0),
        "node-1": (Member(source="ckpt", instance="node-1", instances=3, created=CREATED), 10.0),
    }
    out = assemble([], members, cfg(heartbeat=30.0), None, 130.0)
    assert out.silent == {"node-1": 120.0}


@pytest.mark.parametrize("name", ["step-1", "ステップ", "bad\udcff"])
def test_parts_and_members_round_trip_with_any_set_name(name: str) -> None:
    p = part("node-0", entry(f"{name}/x"), name=name)
    assert parse_part(encode(p), where="k") == p
    m = Member(
        source="ckpt", instance="node-0", instances=3, created=CREATED,
        sets=(MemberSet(name=name, files=1, bytes=10, newest_mtime_ns=1, declared=False, reason="quiet"),),
    )  # fmt: skip
    assert parse_member(encode(m), where="k") == m


def test_a_part_naming_a_file_outside_its_set_is_refused() -> None:
    from replicator.errors import RepositoryError

    bad = part("node-0", entry("step-1/x")).model_copy(update={"files": (entry("step-2/x"),)})
    with pytest.raises(RepositoryError, match="is not in set"):
        parse_part(encode(bad), where="parts/ckpt/node-0/k")
