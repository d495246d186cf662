"""``replicator stats``: per target, what the repository stores, what its retained snapshots
reference, what ``prune`` would free, dedup and compression, what each snapshot alone holds,
and the monthly storage cost; and ``plan``'s projection of the storage it leaves. Checked
exactly against the files the test wrote and listings of real targets (POSIX, ``rclone serve
s3``), never against the code under test."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from replicator.config import TargetConfig
from replicator.config import target_config as parse_target
from replicator.gc.stats import repository_stats
from replicator.repository import Repository, chunk_key, snapshot_key
from replicator.targets import open_target
from replicator.targets.base import ObjectInfo, Target
from replicator.targets.wrappers import TargetWrapper
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.helpers import config_dict
from tests.test_prune import repo_args, run

T = TypeVar("T")
SMALL_CHUNKS = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}
PRICE = 0.023
GIB = 1 << 30
DATA = ("chunks/", "packs/")


def tcfg_of(spec: TargetSpec) -> TargetConfig:
    return parse_target(dict(spec.config))


async def listing(tcfg: TargetConfig, prefix: str = "") -> dict[str, tuple[int, float | None]]:
    """Every object under ``prefix``: key -> (size, modification time)."""
    target = await open_target(tcfg)
    try:
        return {i.key: (i.size, i.mtime) async for i in target.list(prefix)}
    finally:
        await target.close()


def data_objects(tcfg: TargetConfig) -> dict[str, int]:
    objects = run(lambda: listing(tcfg))
    return {k: size for k, (size, _) in objects.items() if k.startswith(DATA)}


async def unique_stored(tcfg: TargetConfig, sizes: dict[str, int]) -> int:
    """Stored bytes of every distinct chunk the retained manifests name, read with the
    repository's reader: a packed chunk's stretch of its pack, a loose chunk's object."""
    target = await open_target(tcfg)
    try:
        repo = await Repository.open(target)
        stored: dict[str, int] = {}
        for source in await repo.list_sources():
            for sid in await repo.list_snapshots(source):
                m = await repo.load_manifest(source, sid)
                for f in m.files:
                    for cid, _ in f.chunks:
                        at = m.packed.get(cid)
                        stored[cid] = at[2] if at is not None else sizes[chunk_key(cid)]
        return sum(stored.values())
    finally:
        await target.close()


class Story:
    """A dataset source ``d`` (keep_last 2) synced three times. Every file's content is
    distinct and random (no chunk is shared between two files), so the logical bytes are
    known from the files alone. s1: A, B, S; s2: A, C, S; s3: A, D, S, T. The third sync's
    retention forgets s1, leaving B's chunks unreferenced."""

    def __init__(self, tmp_path: Path, spec: TargetSpec, *, price: float | None = PRICE) -> None:
        self.spec, self.tcfg = spec, tcfg_of(spec)
        self.primary = tmp_path / "primary"
        self.primary.mkdir()
        self.rng = random.Random(7)
        target = dict(spec.config)
        if price is not None:
            target["cost"] = {"storage_usd_per_gib_month": price}
        source = {"name": "d", "url": str(self.primary), "keep_last": 2, "max_delete": "100%"}
        data = config_dict(tmp_path, [source], [target], chunking=SMALL_CHUNKS)
        self.cfg = write_config(tmp_path / "r.yaml", data)
        self.files: list[dict[str, int]] = []
        """Per sync: the primary's files (name -> size) its snapshot holds."""
        self.new_keys: list[dict[str, int]] = []
        """Per sync: the chunk objects and packs it added (name -> stored size)."""

    def write(self, name: str, size: int, text: bool = False) -> None:
        if text:  # compressible, still unique
            words = [f"{name}-{self.rng.randrange(1000)}" for _ in range(size // 8)]
            body = (" ".join(words).encode() * 2)[:size]
        else:
            body = self.rng.randbytes(size)
        (self.primary / name).write_bytes(body)

    def sync(self) -> None:
        before = data_objects(self.tcfg)
        res = cli("sync", "-c", str(self.cfg), "-q")
        assert res.returncode == 0, res.stderr
        after = data_objects(self.tcfg)
        self.new_keys.append({k: n for k, n in after.items() if k not in before})
        self.files.append({p.name: p.stat().st_size for p in self.primary.iterdir()})

    def play(self) -> None:
        self.write("A.bin", 300_000)
        for i in range(4):
            self.write(f"S-{i}.txt", 3000 + 100 * i, text=True)
        self.write("B.bin", 300_000)
        self.sync()
        (self.primary / "B.bin").unlink()
        self.write("C.bin", 280_000)
        self.sync()
        (self.primary / "C.bin").unlink()
        self.write("D.bin", 260_000)
        for i in range(3):
            self.write(f"T-{i}.txt", 2000 + 100 * i, text=True)
        self.sync()


def stats_json(*args: str) -> dict[str, Any]:
    res = cli("stats", *args, "--json")
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)
    assert isinstance(doc, dict)
    return doc


def prune_deleted(spec: TargetSpec) -> tuple[int, int]:
    res = cli("prune", *repo_args(spec), "--grace", "0", "--json")
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)
    return doc["deleted_objects"], doc["deleted_bytes"]


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_stats_numbers_match_the_files_written_and_the_listing(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    spec = make_target_spec(request, kind, tmp_path)
    story = Story(tmp_path, spec)
    story.play()
    tcfg = story.tcfg
    everything = run(lambda: listing(tcfg))
    stored: dict[str, list[int]] = {}
    for p in (*DATA, "snapshots/"):
        sizes_p = [n for k, (n, _) in everything.items() if k.startswith(p)]
        stored[p] = [len(sizes_p), sum(sizes_p)]
    assert stored["snapshots/"][0] == 2  # s1 was forgotten by the third sync's retention

    doc = stats_json("-c", str(story.cfg))
    assert doc["target"] == "t1" and doc["sources"] == 1 and doc["snapshots"] == 2
    assert {p: [u["objects"], u["bytes"]] for p, u in doc["stored"].items()} == stored
    total = sum(n for _, n in stored.values())
    assert (doc["total_objects"], doc["total_bytes"]) == (sum(c for c, _ in stored.values()), total)

    # Logical bytes: every retained snapshot's files, and each distinct content once.
    s2, s3 = story.files[1], story.files[2]
    assert doc["logical_bytes"] == sum(s2.values()) + sum(s3.values())
    unique_logical = sum({**s2, **s3}.values())
    assert doc["unique_logical_bytes"] == unique_logical
    assert doc["dedup_ratio"] == pytest.approx(doc["logical_bytes"] / unique_logical, rel=1e-9)
    sizes = data_objects(tcfg)
    stored_unique = run(lambda: unique_stored(tcfg, sizes))
    assert doc["unique_stored_bytes"] == stored_unique
    assert doc["compression_ratio"] == pytest.approx(unique_logical / stored_unique, rel=1e-9)

    # What each snapshot alone holds: what its own sync added (no later one shares it).
    per = {s["snapshot"]: s for s in doc["per_snapshot"]}
    assert len(per) == 2
    ordered = [per[k] for k in sorted(per)]
    for usage, added, files in zip(ordered, story.new_keys[1:], story.files[1:], strict=True):
        assert usage["source"] == "d"
        assert (usage["unique_objects"], usage["unique_bytes"]) == (len(added), sum(added.values()))
        assert usage["logical_bytes"] == sum(files.values()) and usage["files"] == len(files)
        assert usage["unique_bytes"] > 0

    assert doc["storage_usd_per_gib_month"] == PRICE
    assert doc["storage_usd_per_month"] == pytest.approx(total / GIB * PRICE, rel=1e-9)
    assert doc["reclaimable_usd_per_month"] == pytest.approx(doc["reclaimable_bytes"] / GIB * PRICE, rel=1e-9)

    # Reclaimable: exactly what two prunes delete; live: exactly what is left of the data.
    assert doc["reclaimable_bytes"] > 0 and doc["missing_objects"] == 0
    assert doc["live_bytes"] + doc["reclaimable_bytes"] == stored["chunks/"][1] + stored["packs/"][1]
    assert prune_deleted(spec) == (0, 0)
    assert prune_deleted(spec) == (doc["reclaimable_objects"], doc["reclaimable_bytes"])
    left = data_objects(tcfg)
    assert (len(left), sum(left.values())) == (doc["live_objects"], doc["live_bytes"])

    after = stats_json(*repo_args(spec))  # another host: no config, no state, no price
    assert (after["reclaimable_objects"], after["reclaimable_bytes"]) == (0, 0)
    assert (after["live_objects"], after["live_bytes"]) == (doc["live_objects"], doc["live_bytes"])
    assert after["per_snapshot"] == doc["per_snapshot"]
    assert after["storage_usd_per_gib_month"] is None and after["storage_usd_per_month"] is None


def test_stats_never_writes_and_prints_text(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    story = Story(tmp_path, spec)
    story.play()
    before = run(lambda: listing(story.tcfg))
    assert spec.path is not None
    dirs_before = sorted(str(p) for p in spec.path.rglob("*"))
    text = cli("stats", "-c", str(story.cfg))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "reclaimable" in out and "dedup" in out and "compression" in out and "/month" in out
    assert out.count("unique") >= 2  # one line per snapshot
    no_price = cli("stats", *repo_args(spec))
    assert no_price.returncode == 0, no_price.stderr
    assert "storage cost: not configured" in no_price.stdout
    assert run(lambda: listing(story.tcfg)) == before
    assert sorted(str(p) for p in spec.path.rglob("*")) == dirs_before


def test_stats_of_a_missing_or_empty_repository_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    res = cli("stats", "--repo", str(missing))
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "no replicator repository" in res.stderr
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("stats", "--repo", str(empty), "--json")
    assert res.returncode != 0 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "no replicator repository" in res.stderr
    assert list(empty.iterdir()) == []
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [], [{"name": "t", "url": str(empty)}]))
    res = cli("stats", "-c", str(cfg), "-t", "nope")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("price", [PRICE, None])
def test_plan_shows_the_storage_cost_of_what_is_retained(
    tmp_path: Path, request: pytest.FixtureRequest, price: float | None
) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    story = Story(tmp_path, spec, price=price)
    story.write("A.bin", 300_000)
    story.write("S-0.txt", 3000, text=True)

    first = cli("plan", "-c", str(story.cfg), "--json")  # no repository yet: all of it is new
    assert first.returncode == 0, first.stderr
    (t,) = json.loads(first.stdout)["targets"]
    assert t["stored_bytes_now"] == 0 and t["stored_bytes_after"] == t["bytes"] > 0

    story.sync()
    story.write("B.bin", 200_000)
    everything = run(lambda: listing(story.tcfg))
    retained = sum(n for k, (n, _) in everything.items() if k.startswith((*DATA, "snapshots/")))
    res = cli("plan", "-c", str(story.cfg), "--json")
    assert res.returncode == 0, res.stderr
    (t,) = json.loads(res.stdout)["targets"]
    assert t["bytes"] > 200_000
    assert t["stored_bytes_now"] == retained
    assert t["stored_bytes_after"] == retained + t["bytes"]
    text = cli("plan", "-c", str(story.cfg))
    assert text.returncode == 0, text.stderr
    if price is None:
        assert t["storage_usd_per_month_after"] is None
        assert "storage cost: not configured" in text.stdout
    else:
        cost = (retained + t["bytes"]) / GIB * price
        assert t["storage_usd_per_month_after"] == pytest.approx(cost, rel=1e-9)
        assert "retained after this sync" in text.stdout and "/month" in text.stdout

    # A manifest that cannot be read: the plan stands, and says what it could not count.
    assert spec.path is not None
    (manifest,) = (spec.path / "snapshots" / "d").iterdir()
    manifest.write_bytes(b"garbage")
    res = cli("plan", "-c", str(story.cfg), "--json")
    assert res.returncode == 0, res.stderr
    (t,) = json.loads(res.stdout)["targets"]
    assert t["stored_bytes_now"] is None and t["stored_bytes_after"] is None
    assert "could not be counted" in t["storage_note"]
    text = cli("plan", "-c", str(story.cfg))
    assert text.returncode == 0 and "could not be counted" in text.stdout


class RetentionRace(TargetWrapper):
    """A writer's retention deletes manifest ``gone`` after the listing showed it, while the
    read of manifest ``slow`` is still under way: it returns only once the mark has started
    again (its second listing of snapshots/)."""

    def __init__(self, inner: Target, gone: str, slow: str) -> None:
        super().__init__(inner)
        self.gone, self.slow = gone, slow
        self.listings = 0
        self.again = asyncio.Event()
        self.slow_reads = 0

    def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        if prefix == "snapshots/":
            self.listings += 1
            if self.listings == 2:
                self.again.set()
        return self.inner.list(prefix, start_after=start_after)

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if key == self.gone:
            await self.inner.delete(key)
        elif key == self.slow:
            self.slow_reads += 1
            if self.slow_reads == 1:
                await self.again.wait()
        return await self.inner.get(key, offset=offset, length=length)


def test_a_manifest_deleted_while_read_counts_each_remaining_snapshot_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    story = Story(tmp_path, spec)
    story.play()

    async def go() -> tuple[int, dict[str, Any]]:
        inner = await open_target(story.tcfg)
        try:
            repo = await Repository.open(inner)
            s2, s3 = await repo.list_snapshots("d")
            race = RetentionRace(inner, snapshot_key("d", s2), snapshot_key("d", s3))
            stats = await repository_stats(await Repository.open(race))
            return race.listings, stats.to_json()
        finally:
            await inner.close()

    listings, doc = run(go)
    assert listings == 2  # the mark started again after the manifest vanished
    assert doc["snapshots"] == 1 and len(doc["per_snapshot"]) == 1
    assert doc["logical_bytes"] == sum(story.files[2].values())
    assert doc["unique_logical_bytes"] == sum(story.files[2].values())
