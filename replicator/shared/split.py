"""Scale-out of one directory: which instance reads which file (``shared.split``).

Every instance sees the whole directory (a shared filesystem) and runs the same consistency
gate on all of it; it then reads and contributes only the files whose path hashes to its
number. The hash is fixed (XXH3-64 of the path's bytes, modulo the number of instances) so
that every instance, whatever its version or host, agrees on the split without talking to
the others. Files outside checkpoint sets are read by the assembler alone, which publishes
them from its own candidate.
"""

from __future__ import annotations

import xxhash

from replicator.config import SharedConfig
from replicator.paths import encode_path
from replicator.reconcile import set_name


def owner(path: str, instances: int) -> int:
    """The number of the instance that reads ``path``, a file of a checkpoint set."""
    return xxhash.xxh3_64_intdigest(encode_path(path)) % instances


def mine(cfg: SharedConfig | None, path: str) -> bool:
    """Whether this instance reads ``path`` (always, unless it splits a shared directory)."""
    if cfg is None or not cfg.split:
        return True
    if set_name(path) is None:
        return cfg.is_assembler  # files outside sets are published from its own candidate
    return owner(path, cfg.instances) == cfg.index
