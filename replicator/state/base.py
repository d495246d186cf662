"""What the typed stores (files, chunks, published, rpo, spend) need of the core store
(replicator.state.store): its database and its write batching. A protocol, so that the core
can build the typed stores without the typed stores importing the core."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Protocol


class Buffer(Protocol):
    """Rows a typed store keeps in memory until the store writes them."""

    def pending(self) -> int:
        """How many rows are waiting to be written."""
        ...

    def write(self) -> int:
        """Write them, inside the open transaction; return how many were written."""
        ...


class Core(Protocol):
    """The core store, as the typed stores use it."""

    db: sqlite3.Connection
    started: float
    """When this process opened the store (Unix time)."""

    def register(self, buffer: Buffer) -> None:
        """Have the store write ``buffer``'s rows in its batches."""
        ...

    def buffered(self) -> None:
        """A buffer took rows (the store writes every buffer once they hold a batch)."""
        ...

    def flush(self) -> None:
        """Write every buffered row (before a read that must see them all)."""
        ...

    def touch(self, n: int = 1) -> None:
        """``n`` rows were written directly (not buffered)."""
        ...

    def commit(self) -> None: ...

    def insert(self, head: str, rows: Sequence[tuple[object, ...]], tail: str = "") -> None:
        """``head (?,..),(?,..),.. tail``, many rows per statement."""
        ...
