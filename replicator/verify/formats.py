"""Format checks for restored ML artifacts: is this file what a training job can read?

A digest proves the bytes are the bytes that were replicated; these checks prove those bytes
are a usable artifact of their kind (a checkpoint written while a disk filled up replicates
perfectly and is still useless). The kind is known from the file name:

* ``*.safetensors``: the header parses; every tensor's dtype and shape agree with its byte
  range, and the ranges tile the data section exactly (no gap, no overlap, nothing past the
  end of the file). ``*.safetensors.index.json``: every shard it maps to is in the snapshot.
* ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.bin`` in zip form (``torch.save``): the archive is
  intact (every member's CRC), ``data.pkl`` is a well-formed pickle and every storage it
  references is a member. Non-zip ``.pt``/``.pth``/``.ckpt`` are legacy torch files: digest only.
* ``.metadata`` (torch.distributed.checkpoint): every storage file it names is in the
  snapshot and long enough for the byte range it is given.
* ``*.npy``: the header parses and the data size matches dtype x shape; ``*.npz``: the zip is
  intact and every member ``.npy`` is, as above.
* ``*.parquet``: magic at both ends, footer length within the file, footer ending in a Thrift
  stop byte; with pyarrow installed, the footer metadata parses.
* ``*.json``: parses (files up to 64 MiB); ``*.jsonl``/``*.ndjson``: every line parses.
* anything else: the digest check only.

Pickles (``data.pkl``, ``.metadata``) are untrusted input: they are read by an unpickler that
never imports or calls anything. Every global a pickle names becomes an inert stand-in that
records its arguments, so the structure can be inspected without running a byte of it.
Every check streams with bounded memory and reads nothing but the file it is given.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeGuard

import numpy as np
from numpy.lib import format as npy_format

from replicator.paths import check_relative_path

JSON_LIMIT = 64 << 20
"""JSON documents larger than this are not parsed (a single document must be held in memory)."""
SAFETENSORS_HEADER_LIMIT = 100_000_000
"""The safetensors library's own ceiling on header size."""
PICKLE_LIMIT = 1 << 30
NPY_HEADER_LIMIT = 1 << 20
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# bits per element; sub-byte types (fp4, fp6) pack, so sizes are computed in bits
# fmt: off
_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# fmt: on


class FormatProblem(Exception):
    """The file is not a valid artifact of its kind; the message says why, in one line."""


@dataclass(frozen=True)
class FormatCheck:
    format: str
    """Which check ran: safetensors, torch-zip, dcp, npy, npz, parquet, json, jsonl, ..."""
    problem: str | None = None
    """None if the file passed."""
    note: str | None = None
    """Why a check was partial (too large to parse, legacy format), when it was."""


def format_of(path: str) -> str | None:
    """The check a file gets, from its name; None for digest only."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".safetensors.index.json"):
        return "safetensors-index"
    if name == ".metadata":
        return "dcp"
    for suffix, kind in (
        (".safetensors", "safetensors"),
        (".npy", "npy"),
        (".npz", "npz"),
        (".parquet", "parquet"),
        (".json", "json"),
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
    ):
        if name.endswith(suffix):
            return kind
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    return None


def check_file(f: IO[bytes], path: str, files: Mapping[str, int]) -> FormatCheck | None:
    """Check one file of a snapshot. ``f`` is open for reading at offset 0, ``path`` its path in
    the snapshot, ``files`` every path in the snapshot with its size (for checks that span a
    directory). None if the file's kind has no check."""
    kind = format_of(path)
    if kind is None:
        return None
    size = os.fstat(f.fileno()).st_size
    try:
        if kind == "torch":
            magic = f.read(4)
            if magic != b"PK\x03\x04":
                if path.lower().endswith(".bin"):
                    return None  # a .bin that is not a zip is not a torch.save archive: digest only
                if magic[:1] != b"\x80":  # legacy torch.save files are pickles (protocol >= 2)
                    raise FormatProblem("neither a torch.save zip archive nor a legacy torch pickle")
                return FormatCheck("torch-legacy", note="legacy (non-zip) torch file: digest only")
            f.seek(0)
            _check_torch_zip(f)
            return FormatCheck("torch-zip")
        return FormatCheck(kind, note=_CHECKERS[kind](f, size, path, files))
    except FormatProblem as exc:
        return FormatCheck("torch-zip" if kind == "torch" else kind, problem=str(exc))


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatProblem(f"truncated: {what} needs {n} bytes, the file has {len(data)} left")
    return data


# -- safetensors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors header, validated: its dtype name, shape and byte range
    relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def safetensors_header(f: IO[bytes], size: int) -> tuple[int, list[SafetensorsEntry]]:
    """Parse and validate a safetensors header (``f`` at offset 0, ``size`` bytes long): the
    offset where the data section starts and every tensor, each checked on its own (its dtype
    is known and dtype x shape equals its byte range). FormatProblem if not."""
    (n,) = struct.unpack("<Q", _read_exact(f, 8, "the header length"))
    if n > SAFETENSORS_HEADER_LIMIT or 8 + n > size:
        raise FormatProblem(f"header length {n} does not fit the file ({size} bytes)")
    raw = _read_exact(f, n, "the header")
    if not raw.startswith(b"{"):
        raise FormatProblem("header is not a JSON object")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatProblem(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatProblem("header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FormatProblem("__metadata__ must map strings to strings")
            continue
        entries.append(_safetensors_entry(name, info))
    return 8 + n, entries


def _safetensors_entry(name: str, info: Any) -> SafetensorsEntry:
    if not isinstance(info, dict):
        raise FormatProblem(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    bits = _SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None or not isinstance(dtype, str):
        raise FormatProblem(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatProblem(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatProblem(f"tensor {name!r}: bad data_offsets {offsets!r}")
    nbits = math.prod(shape) * bits
    if nbits % 8 or nbits // 8 != offsets[1] - offsets[0]:
        raise FormatProblem(
            f"tensor {name!r}: {dtype}{shape} needs {nbits / 8:g} bytes, "
            f"data_offsets give {offsets[1] - offsets[0]}"
        )
    return SafetensorsEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_safetensors(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    start, entries = safetensors_header(f, size)
    data_len = size - start
    pos = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end, e.name)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap at byte {pos}"
            raise FormatProblem(f"tensor {e.name!r} {what}")
        pos = e.end
    if pos != data_len:
        raise FormatProblem(f"tensors cover {pos} bytes of data, the file holds {data_len}")
    return None


def _is_count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_safetensors_index(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    base = _base(path)
    for shard in sorted(safetensors_index_needs(f, size, path)):
        if shard not in files:
            raise FormatProblem(f"shard {shard[len(base) :]!r} named in weight_map is not in the snapshot")
    return None


def safetensors_index_needs(f: IO[bytes], size: int, path: str) -> dict[str, int]:
    """The shards an index at ``path`` maps tensors to (paths next to it) -> 1 (a size they
    must at least have). Also what a shared source's part says its set needs (FORMAT §11)."""
    doc = _load_json(f, size)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatProblem("no weight_map object mapping tensor names to shard files")
    base = _base(path)
    return {_join(base, shard): 1 for shard in set(weight_map.values())}


def _base(path: str) -> str:
    return path.rsplit("/", 1)[0] + "/" if "/" in path else ""


def _join(base: str, rel: str) -> str:
    try:
        check_relative_path(rel)
    except ValueError as exc:
        raise FormatProblem(f"refers to an unsafe path: {exc}") from None
    return base + rel


# -- pickles, inert ----------------------------------------------------------------------------


class Inert:
    """Stands for a global named in a pickle: records how it was built and never runs anything."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    args: tuple[Any, ...]
    state: Any

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # Containers that pickle their items (OrderedDict, list subclasses) get them recorded.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)

    def fields(self) -> dict[str, Any]:
        """The object's attributes as pickled (dict state, or the dict half of slots state)."""
        s = self.state
        if isinstance(s, tuple) and len(s) == 2:
            merged: dict[str, Any] = {}
            for part in s:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return s if isinstance(s, dict) else {}


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, f: IO[bytes], persistent: Callable[[Any], Any] | None) -> None:
        super().__init__(f)
        self._types: dict[tuple[str, str], type[Inert]] = {}
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self._types:
            self._types[key] = type(name, (Inert,), {"qualname": f"{module}.{name}"})
        return self._types[key]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._persistent(pid)


def load_inert(f: IO[bytes], persistent: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle without importing or calling anything (see module docstring)."""
    try:
        return _InertUnpickler(f, persistent).load()
    except FormatProblem:
        raise
    except Exception as exc:  # a malformed pickle can fail in any of a dozen ways
        raise FormatProblem(f"pickle is malformed ({type(exc).__name__}: {exc})") from None


def _check_torch_zip(f: IO[bytes]) -> None:
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
            # torch.save writes "<archive name>/data.pkl" next to "<archive name>/data/<key>"
            pkl = [i for i in infos if i.filename.split("/")[-1] == "data.pkl" and i.filename.count("/") <= 1]
            if len(pkl) != 1:
                raise FormatProblem("not a torch.save archive: no data.pkl (or more than one)")
            prefix = pkl[0].filename[: -len("data.pkl")]
            bad = z.testzip()
            if bad is not None:
                raise FormatProblem(f"archive member {bad} is corrupt (CRC mismatch)")
            if pkl[0].file_size > PICKLE_LIMIT:
                raise FormatProblem("data.pkl is larger than 1 GiB")
            keys: list[str] = []

            def storage(pid: Any) -> Any:
                # torch.save's persistent ids: ("storage", storage type, key, location, numel)
                if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
                    keys.append(str(pid[2]))
                    return Inert()
                raise FormatProblem(f"data.pkl has an unexpected persistent id {pid!r:.60}")

            with z.open(pkl[0]) as p:
                load_inert(p, storage)
            members = {i.filename for i in infos}
            missing = [k for k in keys if f"{prefix}data/{k}" not in members]
            if missing:
                raise FormatProblem(f"data.pkl references storage {missing[0]!r} that is not in the archive")
    except zipfile.BadZipFile as exc:
        raise FormatProblem(f"zip archive is damaged ({exc})") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise FormatProblem(f"zip archive cannot be read ({type(exc).__name__}: {exc})") from None


def _check_dcp(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    base = _base(path)
    for full, end in dcp_needs(f, size, path).items():
        rel = full[len(base) :]
        if full not in files:
            raise FormatProblem(f"storage file {rel!r} is not in the snapshot")
        if end > files[full]:
            raise FormatProblem(
                f"storage file {rel!r} is {files[full]} bytes; metadata needs bytes up to {end}"
            )
    return None


def dcp_needs(f: IO[bytes], size: int, path: str) -> dict[str, int]:
    """Every storage file a DCP ``.metadata`` at ``path`` names (paths next to it) -> the bytes
    it needs of it (the largest offset + length). Also what a shared source's part says its
    set needs (FORMAT §11)."""
    if size > PICKLE_LIMIT:
        raise FormatProblem(".metadata is larger than 1 GiB")
    if size == 0:  # say so rather than "pickle is malformed" (issue 22)
        raise FormatProblem(
            ".metadata is empty (0 bytes): torch.distributed.checkpoint writes it last, so the save "
            "was interrupted or the file was created by hand (touch)"
        )
    meta = load_inert(f)
    if not isinstance(meta, Inert) or not meta.qualname.endswith(".Metadata"):
        raise FormatProblem("not a torch.distributed.checkpoint Metadata object")
    storage = meta.fields().get("storage_data")
    if not isinstance(storage, dict) or not storage:
        raise FormatProblem("metadata names no storage files")
    base, out = _base(path), dict[str, int]()
    for info in storage.values():
        item = info.fields() if isinstance(info, Inert) else {}
        rel, offset, length = item.get("relative_path"), item.get("offset"), item.get("length")
        if not isinstance(rel, str) or not _is_count(offset) or not _is_count(length):
            raise FormatProblem("a storage entry lacks relative_path, offset or length")
        full = _join(base, rel)
        out[full] = max(out.get(full, 0), offset + length)
    return out


# -- numpy -----------------------------------------------------------------------------------


def _npy_header(f: IO[bytes]) -> tuple[int, int]:
    """(header length, data length implied by the header; -1 for object arrays)."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f, max_header_size=NPY_HEADER_LIMIT)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(f, max_header_size=NPY_HEADER_LIMIT)
        else:
            raise FormatProblem(f"unsupported .npy version {version}")
    except FormatProblem:
        raise
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise FormatProblem(f"npy header does not parse ({exc})") from None
    dtype = np.dtype(dtype)
    data = -1 if dtype.hasobject else math.prod(shape) * dtype.itemsize
    return f.tell(), data


def _check_npy(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    header, data = _npy_header(f)
    if data < 0:
        return "object array (pickled data): header only"
    if header + data != size:
        raise FormatProblem(f"header describes {data} bytes of data, the file holds {size - header}")
    return None


def _check_npz(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
            if bad is not None:
                raise FormatProblem(f"archive member {bad} is corrupt (CRC mismatch)")
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as member:
                    try:
                        header, data = _npy_header(member)
                    except FormatProblem as exc:
                        raise FormatProblem(f"{info.filename}: {exc}") from None
                if data >= 0 and header + data != info.file_size:
                    held = info.file_size - header
                    raise FormatProblem(f"{info.filename}: header says {data} bytes, member holds {held}")
    except zipfile.BadZipFile as exc:
        raise FormatProblem(f"zip archive is damaged ({exc})") from None
    return None


# -- parquet, json ---------------------------------------------------------------------------


def _check_parquet(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    if size < 12:
        raise FormatProblem(f"{size} bytes is too short for a Parquet file")
    head = _read_exact(f, 4, "the magic")
    f.seek(size - 8)
    (footer_len,) = struct.unpack("<I", _read_exact(f, 4, "the footer length"))
    tail = _read_exact(f, 4, "the magic")
    if head != b"PAR1" or tail not in (b"PAR1", b"PARE"):
        raise FormatProblem("missing PAR1 magic at the start or end: not Parquet, or truncated")
    if footer_len == 0 or footer_len > size - 12:
        raise FormatProblem(f"footer length {footer_len} does not fit the file ({size} bytes)")
    if tail == b"PARE":
        return "encrypted footer: structure only"
    f.seek(size - 9)
    if f.read(1) != b"\x00":  # a Thrift compact struct always ends with a stop field
        raise FormatProblem("footer metadata does not end where its length says")
    try:
        import pyarrow.parquet as pq  # optional: a deep check when installed
    except ImportError:
        return "footer checked structurally (install pyarrow to parse its metadata)"
    f.seek(0)
    try:
        pq.ParquetFile(f).metadata  # noqa: B018 - parsing the footer is the check
    except Exception as exc:  # pyarrow raises several unrelated types for a bad footer
        raise FormatProblem(f"footer metadata does not parse ({exc})") from None
    return None


def _load_json(f: IO[bytes], size: int) -> Any:
    try:
        return json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatProblem(f"not valid JSON ({exc})") from None


def _check_json(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    if size > JSON_LIMIT:
        return "larger than 64 MiB: not parsed"
    _load_json(f, size)
    return None


def _check_jsonl(f: IO[bytes], size: int, path: str, files: Mapping[str, int]) -> str | None:
    for number, line in enumerate(iter(lambda: f.readline(JSON_LIMIT + 1), b""), 1):
        if len(line) > JSON_LIMIT:
            return f"line {number} is longer than 64 MiB: checked up to it"
        if not line.strip():
            continue
        try:
            json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatProblem(f"line {number} is not valid JSON ({exc})") from None
    return None


_CHECKERS: dict[str, Callable[[IO[bytes], int, str, Mapping[str, int]], str | None]] = {
    "safetensors": _check_safetensors,
    "safetensors-index": _check_safetensors_index,
    "dcp": _check_dcp,
    "npy": _check_npy,
    "npz": _check_npz,
    "parquet": _check_parquet,
    "json": _check_json,
    "jsonl": _check_jsonl,
}
