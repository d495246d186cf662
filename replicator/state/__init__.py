"""The local state store: a SQLite database (WAL) under ``state_dir``.

It is a cache that makes restarts cheap, never the source of truth about a target:

* ``files``: per source file its signature, digests and chunk lists, so an unchanged file is
  not read again. Paths are BLOBs of the name's exact bytes: a name that is not UTF-8 is a
  str with lone surrogates in memory (:mod:`replicator.paths`), which SQLite cannot bind as
  TEXT;
* ``chunks``: per repository (by its id, not the target name) the chunk ids known to be
  stored, and for chunks inside a pack object where they are, so deduplication needs no
  request per chunk. A repository this store has never seen is listed once in full (and its
  latest manifests read, for pack locations) before it is trusted. Each row also says when
  the chunk was last *confirmed* (uploaded, or seen in a listing): a publish relies only on
  claims confirmed by this process (or within the target's ``confirm_window``), and confirms
  the others first (:meth:`replicator.fanout.Uploader.confirm`), so a chunk removed from a
  target behind our back is sent again before any snapshot names it;
* ``published``: the last snapshot written per repository and source, to skip no-op snapshots;
* ``rpo`` and ``lag_history``: what the daemon's lag tracking and status page leave behind.

If the file is lost or corrupt it is set aside and rebuilt from the targets and sources.
The store is used from the event loop thread only; writes are buffered in memory (and
visible to reads at once) and written in batches, inside transactions.
"""

from replicator.state.schema import SCHEMA_VERSION
from replicator.state.store import StateLockedError, StateStore, holder_pid

__all__ = ["SCHEMA_VERSION", "StateLockedError", "StateStore", "holder_pid"]
