"""Content addresses: the chunk id and whole-file digest algorithms a repository may use.

``xxh3-128`` is XXH3's 128-bit variant seeded with the repository's 64-bit seed, written as
its canonical big-endian hex (what ``xxhsum -H2`` prints). It is fast, not cryptographic:
the seed keeps ids of different repositories unrelated. ``blake3`` (256-bit, unkeyed) is the
choice when sources are untrusted and could craft collisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Protocol

import blake3
import xxhash

Algorithm = Literal["xxh3-128", "blake3"]
ALGORITHMS: tuple[Algorithm, ...] = ("xxh3-128", "blake3")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class HashSpec:
    algorithm: Algorithm
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {self.algorithm!r}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError("seed must be an unsigned 64-bit integer")

    @cached_property  # read several times per chunk
    def key(self) -> str:
        """Identifies this spec in the state store: two repositories with equal keys share ids."""
        return f"{self.algorithm}:{self.seed}" if self.algorithm == "xxh3-128" else self.algorithm

    @property
    def digest_size(self) -> int:
        return 16 if self.algorithm == "xxh3-128" else 32

    def digest(self, data: bytes | memoryview) -> bytes:
        if self.algorithm == "xxh3-128":
            return xxhash.xxh3_128_digest(data, seed=self.seed)
        return blake3.blake3(data).digest()

    def hasher(self) -> Hasher:
        if self.algorithm == "xxh3-128":
            return xxhash.xxh3_128(seed=self.seed)
        return blake3.blake3()

    def parse_hex(self, text: str) -> bytes:
        """Parse an id read from untrusted input; ValueError unless it is well formed."""
        if len(text) != 2 * self.digest_size:
            raise ValueError(f"expected {2 * self.digest_size} hex digits, got {len(text)}")
        raw = bytes.fromhex(text)
        if raw.hex() != text:
            raise ValueError("ids are lowercase hex")
        return raw
