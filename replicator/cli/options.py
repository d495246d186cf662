"""The command line's options, declared once: the types :mod:`replicator.cli`'s commands take
(shared ones, and those whose help is long), and the rewrite that lets ``--read-data`` stand
alone. Imports only typer: ``replicator --help`` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

# -- shared -----------------------------------------------------------------------------------

ConfigPath = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="REPLICATOR_CONFIG", help="YAML config file.", show_default=False),
]
Repo = Annotated[
    str | None,
    typer.Option(
        "--repo",
        envvar="REPLICATOR_REPO",
        help="Open a repository directly by URL (a directory or s3://bucket/prefix), without a "
        "config file: what a disaster-recovery site has.",
        show_default=False,
    ),
]
Target = Annotated[
    str | None,
    typer.Option("--target", "-t", envvar="REPLICATOR_TARGET", help="Target name from the config."),
]
Source = Annotated[
    str | None, typer.Option("--source", "-s", envvar="REPLICATOR_SOURCE", help="Only this source.")
]
Targets = Annotated[
    list[str] | None,
    typer.Option("--target", "-t", envvar="REPLICATOR_TARGET", help="Only this target (repeatable)."),
]
Sources = Annotated[
    list[str] | None,
    typer.Option("--source", "-s", envvar="REPLICATOR_SOURCE", help="Only this source (repeatable)."),
]
Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url", envvar="REPLICATOR_ENDPOINT_URL", help="S3 endpoint for --repo (default: AWS)."
    ),
]
Region = Annotated[
    str | None, typer.Option("--region", envvar="REPLICATOR_REGION", help="S3 region for --repo.")
]
Profile = Annotated[
    str | None, typer.Option("--profile", envvar="REPLICATOR_PROFILE", help="AWS profile for --repo.")
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
GiveUp = Annotated[
    str | None,
    typer.Option(
        "--give-up-after",
        envvar="REPLICATOR_GIVE_UP_AFTER",
        metavar="DURATION",
        help="Stop retrying a target that does not answer after this long, and exit 3 "
        "(default: the target's retry.command_give_up_after, 30s).",
        show_default=False,
    ),
]
LogLevel = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        envvar="REPLICATOR_LOG_LEVEL",
        help="debug, info, warning or error (default: from config, else warning).",
    ),
]


# -- logging conventions every command takes (issue 22): -v, -q, --log-format ------------------
# Their callbacks record the choice for support.setup_logging, so that a command need not
# pass them along (and a command added later gets them by declaring the options).


def _record_verbose(value: int) -> int:
    from replicator.cli.support import LogChoice

    LogChoice.verbose = value
    return value


def _record_quiet(value: bool) -> bool:
    from replicator.cli.support import LogChoice

    LogChoice.quiet = value
    return value


def _record_log_format(value: str | None) -> str | None:
    from replicator.cli.support import LogChoice

    if value is not None and value not in ("text", "json"):
        raise typer.BadParameter(f"text or json (got {value!r})")
    LogChoice.log_format = value
    return value


Verbose = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        callback=_record_verbose,
        help="Log more: -v info, -vv debug (overrides --log-level).",
        show_default=False,
    ),
]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", callback=_record_quiet, help="No progress bars; log errors only.", show_default=False
    ),
]
LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar="REPLICATOR_LOG_FORMAT",
        metavar="text|json",
        callback=_record_log_format,
        help="Log lines as text or JSON objects (default: text on a terminal, JSON otherwise).",
        show_default=False,
    ),
]

Version = Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)]
DemoDir = Annotated[Path, typer.Option("--dir", help="Where to create the demo.")]
ReleaseSource = Annotated[
    str,
    typer.Option(
        "--source", "-s", envvar="REPLICATOR_SOURCE", help="The source whose held publish to release."
    ),
]

# -- prune ------------------------------------------------------------------------------------

Grace = Annotated[
    str,
    typer.Option(
        "--grace",
        metavar="DURATION",
        help="Delete an unreferenced object only in a run at least this long after the run "
        "that planned it (docs/FORMAT.md section 10).",
    ),
]
PruneDryRun = Annotated[
    bool, typer.Option("--dry-run", help="Write and delete nothing; report what a run would do.")
]

# -- sync -------------------------------------------------------------------------------------

AllowDeletes = Annotated[
    bool,
    typer.Option(
        "--allow-deletes",
        help="Publish even if it drops more than the source's `max_delete` share of the "
        "latest snapshot (check the primary first: this is how a wiped primary would look).",
    ),
]

# -- forget -----------------------------------------------------------------------------------

ForgetDryRun = Annotated[
    bool, typer.Option("--dry-run", "-n", help="Say what would be kept and dropped; delete nothing.")
]

# -- restore ----------------------------------------------------------------------------------

RestoreSource = Annotated[
    str | None,
    typer.Option(
        "--source",
        "-s",
        envvar="REPLICATOR_SOURCE",
        help="Source whose snapshot to restore (default: the only source of the config, or of the "
        "repository).",
        show_default=False,
    ),
]

Dest = Annotated[
    str,
    typer.Argument(
        help="Destination directory (created if needed), or s3://bucket/prefix to restore each "
        "file as a plain object a training job can read directly.",
        metavar="DEST",
        show_default=False,
    ),
]
RestoreSnapshot = Annotated[
    str | None,
    typer.Option("--snapshot", help="Snapshot id (or unique prefix), or 'latest' (the default)."),
]
At = Annotated[
    str | None,
    typer.Option(
        "--at",
        metavar="TIME",
        help="The newest snapshot taken at or before TIME: ISO 8601 (2026-11-22T10:15Z; UTC "
        "unless an offset is given) or a duration ago (90m, 2d). For rolling back past a bad step.",
        show_default=False,
    ),
]
Include = Annotated[
    list[str] | None, typer.Option("--include", "-i", help="Only matching paths (glob, repeatable).")
]
DestEndpoint = Annotated[
    str | None,
    typer.Option("--dest-endpoint-url", help="S3 endpoint of an s3:// DEST (default: --endpoint-url)."),
]
DestRegion = Annotated[
    str | None, typer.Option("--dest-region", help="Region of an s3:// DEST (default: --region).")
]
DestProfile = Annotated[
    str | None, typer.Option("--dest-profile", help="AWS profile for an s3:// DEST (default: --profile).")
]
# restore into a bucket: how its objects are stored (issue 22)
DestSse = Annotated[
    str | None,
    typer.Option(
        "--dest-sse",
        metavar="TYPE",
        help="Server-side encryption of the restored objects: aes256, kms or customer (SSE-C, "
        "the base64 key from the environment variable REPLICATOR_DEST_SSE_CUSTOMER_KEY).",
        show_default=False,
    ),
]
DestKmsKey = Annotated[
    str | None,
    typer.Option(
        "--dest-kms-key-id", help="With --dest-sse kms: the KMS key id, ARN or alias.", show_default=False
    ),
]
DestStorageClass = Annotated[
    str | None,
    typer.Option(
        "--dest-storage-class", help="S3 storage class of the restored objects.", show_default=False
    ),
]
DestTags = Annotated[
    list[str] | None,
    typer.Option("--dest-tag", metavar="KEY=VALUE", help="Tag every restored object (repeatable)."),
]
NoSync = Annotated[
    bool,
    typer.Option(
        "--no-sync",
        help="Do not flush the restored files to disk before reporting success; leave it to the "
        "OS, as restic and rclone do. Faster, but a power cut or OS crash shortly after the restore "
        "may lose or tear restored files although it reported success (running the same "
        "restore again detects and repairs them: every file is re-checked against its digest). "
        "No effect on an s3:// DEST, whose objects are durable once stored.",
    ),
]

# -- verify -----------------------------------------------------------------------------------

VerifySnapshot = Annotated[
    str | None,
    typer.Option(
        "--snapshot",
        help="Only this snapshot id, or 'latest'. Default: check every snapshot; drill the latest.",
    ),
]
ReadData = Annotated[
    str | None,
    typer.Option(
        "--read-data",
        metavar="[PCT]",
        help="Also download, decompress and re-hash chunks: all, or a random PCT of them.",
    ),
]
RestoreDrill = Annotated[
    bool,
    typer.Option(
        "--restore-drill",
        help="Also restore the snapshot of each source into a scratch directory, check every "
        "file's digest and the format of known artifacts (safetensors, torch.save zips, "
        "torch.distributed.checkpoint, .npy/.npz, Parquet, JSON/JSONL), and report restore "
        "throughput, an RTO estimate and the newest checkpoint set training can resume from.",
    ),
]
Scratch = Annotated[
    Path | None,
    typer.Option(
        "--scratch",
        metavar="DIR",
        help="Where the drill restores to (DIR/TARGET/SOURCE/), kept afterwards; needs "
        "room for the snapshot. Default: a temporary directory, removed afterwards.",
        show_default=False,
    ),
]
LoadTorch = Annotated[
    bool,
    typer.Option(
        "--load",
        help="With --restore-drill: also load every checkpoint with PyTorch on the CPU (DCP "
        "directories, safetensors, torch.save files; weights_only) and check each tensor's shape "
        "and dtype against the checkpoint's metadata; report per checkpoint set (needs torch).",
    ),
]
Repair = Annotated[
    bool,
    typer.Option(
        "--repair",
        help="Send again every missing or damaged chunk that the sources still hold (read from "
        "the files the snapshots name); say which could not be repaired. Needs --config.",
    ),
]


# -- config check -----------------------------------------------------------------------------

Online = Annotated[
    bool,
    typer.Option(
        "--online",
        help="Also reach every source and target and check the permissions replicator needs "
        "(a scratch object is written to each target and deleted).",
    ),
]


def optional_values(args: list[str]) -> list[str]:
    """Let ``--read-data`` stand alone meaning 100 %: click options cannot take an optional
    value, so a bare ``--read-data`` gets its default spelled out before parsing."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--read-data":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("-") or not nxt.rstrip("%").replace(".", "", 1).isdigit():
                out.append("100")
    return out


# -- ls, diff, and restore's overwrite rules (issue 22) ---------------------------------------

InspectSource = Annotated[
    str,
    typer.Option(
        "--source",
        "-s",
        envvar="REPLICATOR_SOURCE",
        help="The source whose snapshots to look at.",
        show_default=False,
    ),
]
LsGlobs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Only paths matching these globs (as restore's --include: `*.safetensors`, "
        "`step-000200`, `step-*/model-*`).",
        metavar="GLOB",
        show_default=False,
    ),
]
DiffOld = Annotated[
    str,
    typer.Argument(help="The older snapshot: an id, a unique prefix, or 'latest'.", metavar="SNAP1"),
]
DiffNew = Annotated[
    str,
    typer.Argument(help="The newer snapshot: an id, a unique prefix, or 'latest'.", metavar="SNAP2"),
]
Overwrite = Annotated[
    Literal["always", "if-changed", "never"],
    typer.Option(
        "--overwrite",
        help="What to do with a file DEST already has: if-changed (the default) leaves it "
        "alone if its bytes already match the snapshot (hashed, never judged by size or "
        "mtime) and replaces it otherwise; always writes it again, identical or not; never "
        "leaves every existing file untouched and lists it. Files DEST has that the snapshot "
        "does not are never touched.",
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        "-n",
        help="Write nothing (not even DEST): list what would be restored new, what would be "
        "replaced and what would be left alone or kept. Existing files are read (hashed) to tell.",
    ),
]
