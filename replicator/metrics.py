"""Every Prometheus metric replicator exports, declared in one place (docs/METRICS.md).

Names use the ``replicator_`` prefix and ``_total`` / ``_seconds`` / ``_bytes`` suffixes.
Labels are ``source`` and ``target`` only, plus two small closed sets: ``kind`` on error
counters and ``op`` on request counters. They live in their own registry so that a process
(or a test) can render exactly replicator's metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

from replicator import __version__

# No *_created series: they double the output and nobody alerts on them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

BUILD = Info("replicator_build", "Version of the running replicator.", registry=REGISTRY)
BUILD.info({"version": __version__})

# -- recovery point -------------------------------------------------------------------------
RPO_LAG = Gauge(
    "replicator_rpo_lag_seconds",
    "Age of the oldest change observed on the source that is not yet in a published snapshot "
    "on the target; 0 when caught up.",
    ["source", "target"],
    registry=REGISTRY,
)
RPO_OBJECTIVE = Gauge(
    "replicator_rpo_objective_seconds",
    "Configured recovery point objective (absent when none is set).",
    ["source", "target"],
    registry=REGISTRY,
)
RPO_BREACHED = Gauge(
    "replicator_rpo_breached",
    "1 while the lag exceeds the objective, else 0.",
    ["source", "target"],
    registry=REGISTRY,
)
PENDING_BYTES = Gauge(
    "replicator_pending_bytes",
    "Bytes of changed files not yet in a published snapshot on the target.",
    ["source", "target"],
    registry=REGISTRY,
)
PENDING_FILES = Gauge(
    "replicator_pending_files",
    "Changed files not yet in a published snapshot on the target.",
    ["source", "target"],
    registry=REGISTRY,
)
LAST_SNAPSHOT = Gauge(
    "replicator_last_snapshot_timestamp_seconds",
    "Unix time of the last snapshot published (or confirmed unchanged) on the target.",
    ["source", "target"],
    registry=REGISTRY,
)
SNAPSHOT_DURATION = Histogram(
    "replicator_snapshot_duration_seconds",
    "From the change that started a candidate snapshot to its publication on the target.",
    ["source", "target"],
    buckets=(0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)

# -- data flow -------------------------------------------------------------------------------
READ_BYTES = Counter(
    "replicator_read_bytes_total", "Bytes read from the source.", ["source"], registry=REGISTRY
)
READ_FILES = Counter(
    "replicator_read_files_total", "Files read from the source.", ["source"], registry=REGISTRY
)
SENT_BYTES = Counter(
    "replicator_sent_bytes_total",
    "Bytes uploaded to the target (request bodies of successful PUTs: chunks, manifests, refs).",
    ["target"],
    registry=REGISTRY,
)
CHUNKS_SENT = Counter(
    "replicator_chunks_sent_total",
    "Chunks uploaded (loose objects, and chunks inside packs).",
    ["target"],
    registry=REGISTRY,
)
DEDUP_BYTES = Counter(
    "replicator_deduplicated_bytes_total",
    "Original bytes not sent because the target already held (or was receiving) the chunk.",
    ["target"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "replicator_requests_total",
    "Requests made to the target, by operation (put, get, stat, list, delete), retries included.",
    ["target", "op"],
    registry=REGISTRY,
)

# -- health ----------------------------------------------------------------------------------
TARGET_ERRORS = Counter(
    "replicator_target_errors_total",
    "Failed target requests by kind: transient, unreachable, permanent, not_found.",
    ["target", "kind"],
    registry=REGISTRY,
)
SOURCE_ERRORS = Counter(
    "replicator_source_errors_total",
    "Source problems by kind: changed_while_read, unreadable, scan_failed.",
    ["source", "kind"],
    registry=REGISTRY,
)
TARGET_UP = Gauge(
    "replicator_target_healthy",
    "0 from the first failed request to the target until the next success, else 1.",
    ["target"],
    registry=REGISTRY,
)
TASK_FAILURES = Counter(
    "replicator_task_failures_total",
    "Unexpected exceptions (bugs) in a background task, which was restarted: task is "
    "source-<name>, publish-<name>, upload-<name>, attach-<name>, watch-<name>, prune-<name> or monitor.",
    ["task"],
    registry=REGISTRY,
)

# -- the primary (replicator.reconcile) -------------------------------------------------------
DELETION_HELD = Gauge(
    "replicator_deletion_held",
    "1 while a publish that would drop more than max_delete of the latest snapshot waits for "
    "an operator (replicator release), else 0.",
    ["source", "target"],
    registry=REGISTRY,
)
DAMAGED_SETS = Gauge(
    "replicator_damaged_sets",
    "Checkpoint sets that lost files on the primary, kept whole from an earlier snapshot.",
    ["source", "target"],
    registry=REGISTRY,
)
# -- several instances, one source (replicator.shared) ----------------------------------------
SETS_WAITING = Gauge(
    "replicator_sets_waiting",
    "Checkpoint sets of a shared source some instances' parts are in for, not yet complete "
    "(set on the assembler).",
    ["source", "target"],
    registry=REGISTRY,
)
SET_WAIT_SECONDS = Gauge(
    "replicator_set_wait_seconds",
    "How long the oldest waiting set of a shared source has waited for parts (store time).",
    ["source", "target"],
    registry=REGISTRY,
)
SETS_OVERDUE = Gauge(
    "replicator_sets_overdue",
    "Waiting sets of a shared source past shared.deadline: an instance is missing or stuck.",
    ["source", "target"],
    registry=REGISTRY,
)
INSTANCES_SILENT = Gauge(
    "replicator_instances_silent",
    "Instances of a shared source whose member object is older than three heartbeats.",
    ["source", "target"],
    registry=REGISTRY,
)
CARRIED_ENTRIES = Gauge(
    "replicator_carried_entries",
    "Sets and files the latest publish kept from the previous snapshot because the primary "
    "could not show them complete (unreadable, held back, damaged).",
    ["source", "target"],
    registry=REGISTRY,
)

# -- retention (replicator.retention) ---------------------------------------------------------
SNAPSHOTS_FORGOTTEN = Counter(
    "replicator_snapshots_forgotten_total",
    "Snapshot manifests deleted by the retention policy (after a publish, or replicator forget).",
    ["source", "target"],
    registry=REGISTRY,
)
RETENTION_FAILURES = Counter(
    "replicator_retention_failures_total",
    "Retention passes after a publish that deleted nothing or stopped short: a failed listing, "
    "read or delete, or a listing that missed the latest snapshot.",
    ["source", "target"],
    registry=REGISTRY,
)

# -- scheduled garbage collection (replicator.daemon, target ``prune: {every}``) -------------
PRUNE_RUNS = Counter(
    "replicator_prune_runs_total",
    "Scheduled prune runs by outcome: success (deferred runs included), busy (another prune "
    "held the lock), refused (untrustworthy evidence, nothing deleted), failed.",
    ["target", "outcome"],
    registry=REGISTRY,
)
PRUNE_RECLAIMED_BYTES = Counter(
    "replicator_prune_reclaimed_bytes_total",
    "Stored bytes of chunks and packs deleted by scheduled prune runs.",
    ["target"],
    registry=REGISTRY,
)
PRUNE_DELETED_OBJECTS = Counter(
    "replicator_prune_deleted_objects_total",
    "Chunk objects and packs deleted by scheduled prune runs.",
    ["target"],
    registry=REGISTRY,
)
PRUNE_DURATION = Gauge(
    "replicator_prune_duration_seconds",
    "Duration of the last scheduled prune run, whatever its outcome.",
    ["target"],
    registry=REGISTRY,
)
PRUNE_LAST_SUCCESS = Gauge(
    "replicator_prune_last_success_timestamp_seconds",
    "Unix time the last successful scheduled prune run ended; 0 before the first.",
    ["target"],
    registry=REGISTRY,
)

# -- budget (replicator.budget) --------------------------------------------------------------
SPEND_USD = Gauge(
    "replicator_spend_usd",
    "Spend to date in the current UTC period (period: day or month); target 'all' is the global budget.",
    ["target", "period"],
    registry=REGISTRY,
)
BUDGET_REMAINING_USD = Gauge(
    "replicator_budget_remaining_usd",
    "Budget left in the current period: today's paced allowance, or the month's limit.",
    ["target", "period"],
    registry=REGISTRY,
)
DEFERRED_BYTES = Gauge(
    "replicator_deferred_bytes",
    "Bytes of pending changes the budget holds back, by source priority.",
    ["target", "priority"],
    registry=REGISTRY,
)


REQUEST_OPS = ("put", "get", "stat", "list", "delete")
ERROR_KINDS = ("transient", "unreachable", "permanent", "not_found")
SOURCE_ERROR_KINDS = ("changed_while_read", "unreadable", "scan_failed")
PRUNE_OUTCOMES = ("success", "busy", "refused", "failed")


def initialize(sources: list[str], targets: list[str]) -> None:
    """Create every labelled series at 0 (targets unhealthy until reached), so that dashboards
    and alert rules see 0 rather than "no data" before the first event."""
    for s in sources:
        READ_BYTES.labels(s)
        READ_FILES.labels(s)
        TASK_FAILURES.labels(f"source-{s}")
        TASK_FAILURES.labels(f"watch-{s}")
        for kind in SOURCE_ERROR_KINDS:
            SOURCE_ERRORS.labels(s, kind)
        for t in targets:
            for gauge in (RPO_LAG, RPO_BREACHED, PENDING_BYTES, PENDING_FILES, DELETION_HELD, DAMAGED_SETS):
                gauge.labels(s, t)
            for gauge in (SETS_WAITING, SET_WAIT_SECONDS, SETS_OVERDUE, INSTANCES_SILENT):
                gauge.labels(s, t)
            CARRIED_ENTRIES.labels(s, t)
            SNAPSHOTS_FORGOTTEN.labels(s, t)
            RETENTION_FAILURES.labels(s, t)
    for t in targets:
        for counter in (SENT_BYTES, CHUNKS_SENT, DEDUP_BYTES):
            counter.labels(t)
        for op in REQUEST_OPS:
            REQUESTS.labels(t, op)
        for kind in ERROR_KINDS:
            TARGET_ERRORS.labels(t, kind)
        for task in ("attach", "publish", "upload"):
            TASK_FAILURES.labels(f"{task}-{t}")
        TARGET_UP.labels(t).set(0)
        for outcome in PRUNE_OUTCOMES:
            PRUNE_RUNS.labels(t, outcome)
        for series in (PRUNE_RECLAIMED_BYTES, PRUNE_DELETED_OBJECTS, PRUNE_DURATION, PRUNE_LAST_SUCCESS):
            series.labels(t)
        TASK_FAILURES.labels(f"prune-{t}")
    TASK_FAILURES.labels("monitor")
