"""``replicator plan``: what a sync would send and cost, before anything is sent.

It does what ``sync`` does up to the upload: scan every source, pass the consistency gate,
read and encode the files a sync would read (unchanged files whose chunks every target holds
are skipped, as in sync), and compare each chunk with what each target already holds (the
state store's presence cache, or a listing of the target). Chunks are encoded with the same
encoder, so the bytes to send are the bytes a sync would send; manifests are built and
encoded the same way. Nothing is written: not to the targets, not to the state store (it is
opened read-only, so ``plan`` works beside a running daemon).

Costs apply each target's ``cost`` prices to those bytes and requests; the time is the bytes
over the target's ``max_bandwidth`` (or none, uncapped). Budgets show what remains today.
Storage: what each target would retain after the sync (what its manifests reference now, by
the mark of ``replicator stats``, plus the bytes sent), priced per month when the target has
``cost.storage_usd_per_gib_month``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from replicator import gate
from replicator.budget import Budget, Ledger, Usage
from replicator.config import ChunkingConfig, Config, SourceConfig
from replicator.engine import Candidate, content_key, split_cached
from replicator.errors import FileChangedError, ReplicatorError, SourceError
from replicator.fanout import PACK_SIZE, pack_below
from replicator.format.manifest import encode_manifest, format_time, now_utc
from replicator.gc.protocol import GC_PUTS
from replicator.gc.stats import GIB, repository_stats
from replicator.hashing import HashSpec
from replicator.progress import NoProgress, ProgressSink
from replicator.read.pipeline import ChunkConsumer, ChunkPipeline, EncodedChunk
from replicator.repository import Repository, RepositoryNotFoundError
from replicator.sources import open_source
from replicator.state import StateStore
from replicator.status import BudgetStatus, budget_rows
from replicator.targets import open_target


@dataclass
class SourcePlan:
    source: str
    priority: str
    bytes: int = 0
    chunks: int = 0
    puts: int = 0
    gets: int = 0
    cost_usd: float = 0.0
    budget_allows: bool = True


@dataclass
class TargetPlan:
    target: str
    exists: bool
    bytes: int = 0
    chunks: int = 0
    puts: int = 0
    gets: int = 0
    cost_usd: float = 0.0
    egress_usd: float = 0.0
    requests_usd: float = 0.0
    storage_usd_per_month: float | None = None
    """What the bytes sent add to the monthly storage bill (None: no price configured)."""
    stored_bytes_now: int | None = 0
    """What the repository retains now: the chunk objects and packs its manifests reference,
    and the manifests (``replicator stats``' live + snapshots/ bytes); 0 for a new repository,
    None when it could not be counted (``storage_note`` says why)."""
    stored_bytes_after: int | None = None
    """``stored_bytes_now`` plus the bytes this sync would send. Retention after the publish
    may forget snapshots, but frees nothing until ``prune``, so this is what is paid for."""
    storage_usd_per_month_after: float | None = None
    storage_note: str | None = None
    seconds_at_cap: float | None = None
    sources: list[SourcePlan] = field(default_factory=list)


@dataclass
class Plan:
    files: int = 0
    bytes_scanned: int = 0
    files_read: int = 0
    bytes_read: int = 0
    targets: list[TargetPlan] = field(default_factory=list)
    budgets: list[BudgetStatus] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Target:
    plan: TargetPlan
    repo: Repository | None
    spec: HashSpec
    present: set[str]
    """Chunks the target holds (from the listing), or empty when the state knows."""
    repo_id: str | None
    chunking: ChunkingConfig
    """The repository's (a new one gets the config's): it decides which chunks are packed."""
    counted: set[str] = field(default_factory=set)


async def make_plan(config: Config, progress: ProgressSink | None = None) -> Plan:
    progress = progress or NoProgress()
    started = time.monotonic()
    state = StateStore.open(config.state_dir, read_only=True)
    pipeline: ChunkPipeline | None = None
    try:
        budget = Budget(config, Ledger(state, [t.name for t in config.targets]))
        targets = [await _open(config, t.name, state, progress) for t in config.targets]
        plan = Plan(targets=[t.plan for t in targets], budgets=budget_rows(budget))
        pipeline = ChunkPipeline(
            config.chunking, config.compression, [t.spec for t in targets], memory_budget=config.memory_budget
        )
        for cfg in config.sources:
            candidate, per_target = await _plan_source(cfg, targets, state, pipeline, plan, progress)
            for t in targets:
                sp = per_target[t.plan.target]
                if candidate.records:
                    _add_snapshot_requests(t, cfg.name, candidate, state, sp)
                sp.cost_usd = Usage(sp.bytes, sp.puts, sp.gets).usd(config.target(t.plan.target).cost)
                sp.budget_allows = budget.allows(t.plan.target, cfg.effective_priority, sp.cost_usd)
                t.plan.sources.append(sp)
        for t in targets:
            _totals(config, t.plan)
        plan.seconds = time.monotonic() - started
        return plan
    finally:
        if pipeline is not None:
            pipeline.close()
        state.close()


def _has(t: _Target, state: StateStore, cid: str) -> bool:
    if t.repo_id is not None and state.chunks(t.repo_id).has(cid):
        return True
    return cid in t.present or cid in t.counted


class _Counter(ChunkConsumer):
    """Counts, per target, the chunks it lacks and the bytes and requests sending them takes."""

    def __init__(
        self,
        targets: list[_Target],
        state: StateStore,
        per_target: dict[str, SourcePlan],
        progress: ProgressSink,
    ) -> None:
        self.targets, self.state, self.per_target, self.progress = targets, state, per_target, progress
        self.packed = dict.fromkeys(per_target, 0)
        """Stored bytes of small chunks, sent in packs."""

    def wants(self, ids: dict[str, str]) -> bool:
        return any(not _has(t, self.state, ids[t.spec.key]) for t in self.targets)

    async def take(self, chunk: EncodedChunk) -> None:
        self.progress.advance(chunk.size)
        for t in self.targets:
            cid = chunk.ids[t.spec.key]
            if not _has(t, self.state, cid):
                assert chunk.stored is not None, "wants() said no target needs it"
                t.counted.add(cid)
                sp = self.per_target[t.plan.target]
                sp.bytes += len(chunk.stored)
                sp.chunks += 1
                if chunk.size < pack_below(t.chunking):
                    self.packed[t.plan.target] += len(chunk.stored)
                else:
                    sp.puts += 1


async def _plan_source(
    cfg: SourceConfig,
    targets: list[_Target],
    state: StateStore,
    pipeline: ChunkPipeline,
    plan: Plan,
    progress: ProgressSink,
) -> tuple[Candidate, dict[str, SourcePlan]]:
    """Read what a sync would read; count, per target, the chunks it lacks."""
    per_target = {t.plan.target: SourcePlan(cfg.name, cfg.effective_priority) for t in targets}

    counter = _Counter(targets, state, per_target, progress)
    source = open_source(cfg)
    try:
        listing = await source.scan()
        selection = gate.select(cfg, listing.files, time.time_ns(), listing.unreadable)
        plan.files += len(selection.files)
        plan.bytes_scanned += sum(f.size for f in selection.files)
        known = state.files.get(cfg.name, [(f.path, f.signature) for f in selection.files])
        records, to_read = split_cached(
            selection.files,
            known,
            lambda rec: all(
                t.spec.key in rec.chunks and all(_has(t, state, c) for c, _ in rec.chunks[t.spec.key])
                for t in targets
            ),
        )
        progress.begin(f"{cfg.name}: planning", sum(f.size for f in to_read))
        for f in to_read:
            try:
                rec = await pipeline.read_file(source, f, counter)
            except (FileChangedError, SourceError) as exc:
                plan.skipped[f"{cfg.name}/{f.path}"] = exc.message
                continue
            records.append(rec)
            plan.files_read += 1
            plan.bytes_read += rec.size
        progress.end()
    finally:
        await source.close()
    for name, nbytes in counter.packed.items():
        per_target[name].puts += -(-nbytes // PACK_SIZE)  # packs are sealed at PACK_SIZE or publish
    records.sort(key=lambda r: r.path)
    return Candidate(
        cfg.name, cfg.kind, tuple(records), tuple(selection.sets), format_time(now_utc())
    ), per_target


async def _open(config: Config, name: str, state: StateStore, progress: ProgressSink) -> _Target:
    """The target's repository (never created), hash spec and presence knowledge."""
    cfg = config.target(name)
    target = await open_target(cfg)
    try:
        try:
            repo: Repository | None = await Repository.open(target)
        except RepositoryNotFoundError:
            repo = None
        plan = TargetPlan(name, exists=repo is not None)
        plan.gets += 1  # the repository's config object
        if repo is None:
            # A new repository gets a random seed; any fixed one shows the same duplicates.
            plan.puts += 3  # config.json, then the (empty) listings of its chunks and packs
            plan.gets += 1  # sync reads the config object back after creating it
            return _Target(plan, None, HashSpec(cfg.hash), set(), None, config.chunking)
        await _count_retained(repo, plan, progress)
        present: set[str] = set()
        repo_id: str | None = repo.config.id
        if not state.chunks(repo.config.id).listed:
            listed = [cid async for cid, _ in repo.list_chunks()]
            present = set(listed)
            plan.puts += 2 + len(listed) // 1000  # LIST requests (chunks, packs), as sync will make them
            repo_id = None
        return _Target(plan, repo, repo.hash, present, repo_id, repo.config.chunking)
    finally:
        await target.close()


async def _count_retained(repo: Repository, plan: TargetPlan, progress: ProgressSink) -> None:
    """What the repository retains now (the mark and listings of ``replicator stats``)."""
    try:
        stats = await repository_stats(repo, progress=progress)
    except ReplicatorError as exc:  # the plan stands without it; say why
        plan.stored_bytes_now = None
        plan.storage_note = f"what the repository retains could not be counted: {exc.message}"
        return
    plan.stored_bytes_now = stats.live_bytes + stats.stored["snapshots/"].bytes


def _add_snapshot_requests(
    t: _Target, source: str, candidate: Candidate, state: StateStore, sp: SourcePlan
) -> None:
    """The manifest and ref a sync would write, unless the target already has this content."""
    manifest = candidate.manifest(t.spec)
    if t.repo is not None:
        previous = state.published.get(t.repo.config.id, source)
        if previous is not None and previous.content == content_key(manifest):
            sp.gets += 1  # sync reads the ref to confirm, and writes nothing
            return
    sp.bytes += len(encode_manifest(manifest)) + 100  # + the ref object (~100 bytes of JSON)
    sp.puts += 2 + GC_PUTS


def _totals(config: Config, plan: TargetPlan) -> None:
    cfg = config.target(plan.target)
    for sp in plan.sources:
        plan.bytes += sp.bytes
        plan.chunks += sp.chunks
        plan.puts += sp.puts
        plan.gets += sp.gets
    usage = Usage(plan.bytes, plan.puts, plan.gets)
    plan.cost_usd = usage.usd(cfg.cost)
    plan.egress_usd = Usage(plan.bytes, 0, 0).usd(cfg.cost)
    plan.requests_usd = plan.cost_usd - plan.egress_usd
    price = cfg.cost.storage_usd_per_gib_month
    if plan.stored_bytes_now is not None:
        plan.stored_bytes_after = plan.stored_bytes_now + plan.bytes
    if price is not None:
        plan.storage_usd_per_month = plan.bytes / GIB * price
        if plan.stored_bytes_after is not None:
            plan.storage_usd_per_month_after = plan.stored_bytes_after / GIB * price
    if cfg.max_bandwidth:
        plan.seconds_at_cap = plan.bytes / cfg.max_bandwidth
