"""The drill's loads with PyTorch (``verify --restore-drill --load``), one checkpoint at a time,
on the CPU, in this process, without the model's code. Imported only to load: it imports torch.

* torch.distributed.checkpoint (a directory with ``.metadata``): ``dcp.load`` (no process group)
  into a plain state dict built from the metadata, an empty tensor per entry. Before it, the
  metadata must hold together: each tensor's chunks tile its shape exactly, and every byte
  range it gives lies within a restored storage file. During it, every stored chunk must have
  the shape and dtype ``.metadata`` gives it. After it, every entry has its shape and dtype and
  every non-tensor object was loaded.
* safetensors (one file, or the shards of a ``*.safetensors.index.json``): every tensor the
  index maps to a shard is in that shard's header; each tensor is read and made a torch tensor
  of its dtype and shape (``torch.frombuffer``).
* ``torch.save`` files: ``torch.load(weights_only=True)``, memory-mapped when in zip form.

Nothing from the target runs: ``.metadata`` is unpickled with only DCP's own metadata classes
(and torch dtypes, ``torch.Size``, paths) allowed; tensors and objects load with
``weights_only=True`` (torch's own planner would unpickle objects with ``weights_only=False``).

Memory: a DCP checkpoint is loaded in batches of at most :data:`LOAD_BATCH_BYTES` of tensors
(one tensor alone if it is larger), each stored item read through a window on its file (no
copy of the item's bytes); safetensors one tensor at a time. The peak is about
``max(LOAD_BATCH_BYTES, largest tensor) + largest stored item``: a 10 GiB checkpoint of
tensors under 256 MiB needs about 512 MiB, never the checkpoint's size.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.futures import Future

from replicator.paths import check_relative_path
from replicator.verify.formats import PICKLE_LIMIT, FormatProblem, SafetensorsEntry, safetensors_header

LOAD_BATCH_BYTES = 256 << 20
"""Tensor bytes of a DCP checkpoint held at once (see module docstring)."""

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATH_TYPES = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
# safetensors dtype -> torch dtype attribute; F4 and F6 have no unpacked torch dtype
_SAFETENSORS_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64", "I64": "int64",
    "U64": "uint64", "F64": "float64",
}  # fmt: skip


@dataclass
class Loaded:
    """What one checkpoint's load read."""

    tensors: int = 0
    objects: int = 0
    """Non-tensor entries (DCP's byte items: optimizer hyperparameters, step counters)."""
    bytes: int = 0
    """Tensor data bytes."""
    note: str | None = None
    """What was checked but not loaded, and why."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- torch.distributed.checkpoint --------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found: Any = None
        if module in _DCP_MODULES or (module == "pathlib" and name in _PATH_TYPES):
            found = super().find_class(module, name)
            found = found if isinstance(found, type) else None
        elif module == "torch":
            found = getattr(torch, name, None)
            found = found if isinstance(found, torch.dtype) or found is torch.Size else None
        elif (module, name) == ("torch.serialization", "_get_layout"):  # looks a layout up by name
            found = super().find_class(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata: refused")
        return found


def read_dcp_metadata(path: Path) -> Metadata:
    """``.metadata`` unpickled with nothing but DCP's metadata types allowed (module docstring)."""
    if path.stat().st_size > PICKLE_LIMIT:
        raise FormatProblem(".metadata is larger than 1 GiB")
    try:
        with path.open("rb") as f:
            meta = _MetadataUnpickler(f).load()
    except Exception as exc:  # a malformed pickle fails in a dozen ways
        raise FormatProblem(f".metadata does not load ({_one_line(exc)})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.storage_data, dict):
        raise FormatProblem(".metadata is not a torch.distributed.checkpoint Metadata with storage data")
    return meta


def _check_chunks(fqn: str, md: TensorStorageMetadata) -> None:
    """The chunks of a tensor tile its shape exactly: within it, disjoint, covering it."""
    shape = list(md.size)
    boxes = []
    for c in md.chunks:
        lo, size = list(c.offsets), list(c.sizes)
        if (
            len(lo) != len(shape)
            or len(size) != len(shape)
            or any(o + s > d for o, s, d in zip(lo, size, shape, strict=True))
        ):
            raise FormatProblem(
                f"tensor {fqn!r}: .metadata gives shape {shape}, but its chunk at {lo} of size {size} "
                "lies outside it"
            )
        boxes.append((lo, size))
    for i, (a_lo, a_size) in enumerate(boxes):
        for b_lo, b_size in boxes[:i]:
            if all(
                a < b + bs and b < a + as_ for a, as_, b, bs in zip(a_lo, a_size, b_lo, b_size, strict=True)
            ):
                raise FormatProblem(
                    f"tensor {fqn!r}: .metadata gives chunks at {b_lo} and {a_lo} that overlap"
                )
    covered = sum(_numel(size) for _, size in boxes)
    if covered != _numel(shape):
        raise FormatProblem(
            f"tensor {fqn!r}: .metadata gives shape {shape} ({_numel(shape)} elements), "
            f"its chunks hold {covered}"
        )


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_storage(meta: Metadata, base: str, files: Mapping[str, int]) -> None:
    """Every item .metadata names has a byte range within a restored file of the checkpoint."""
    indexes: list[tuple[str, MetadataIndex]] = []
    for fqn, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            _check_chunks(fqn, md)
            indexes += [(fqn, MetadataIndex(fqn, c.offsets)) for c in md.chunks]
        else:
            indexes.append((fqn, MetadataIndex(fqn)))
    needed: dict[str, tuple[int, str]] = {}
    for fqn, index in indexes:
        info = meta.storage_data.get(index)
        if info is None:
            raise FormatProblem(f"{fqn!r}: .metadata names no storage for it")
        rel = info.relative_path
        try:
            check_relative_path(rel)
        except ValueError as exc:
            raise FormatProblem(f"{fqn!r}: storage path {rel!r} is unsafe ({exc})") from None
        end = info.offset + info.length
        if end > needed.get(rel, (-1, ""))[0]:
            needed[rel] = (end, fqn)
    for rel, (end, fqn) in sorted(needed.items()):
        full = base + rel
        if full not in files:
            raise FormatProblem(f"{full} (storage of {fqn!r}) is not in the snapshot")
        if files[full] < end:
            raise FormatProblem(
                f"{full} is {files[full]} bytes; .metadata needs bytes up to {end} (for {fqn!r}): truncated"
            )


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + length) of an open file: torch.load
    reads one stored item through it without the item's bytes being copied first."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n == 0:
            return 0
        got = os.preadv(self._fd, [view[:n]], self._start + self._pos)
        self._pos += got
        return got


class _CheckingReader(FileSystemReader):
    """A FileSystemReader that serves the safely read metadata and checks each stored chunk's
    shape and dtype against it as it loads (see module docstring)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self.metadata = metadata
        self.problem: str | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for rel, items in sorted(by_file.items()):
            fd = os.open(Path(self.path) / rel, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                for item in sorted(items, key=lambda i: int(self.storage_data[i.storage_index].offset)):
                    try:
                        self._read_item(fd, item, planner)
                    except FormatProblem as exc:
                        self.problem = str(exc)  # dcp.load wraps what read_data raises
                        raise
            finally:
                os.close(fd)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_item(self, fd: int, item: ReadItem, planner: LoadPlanner) -> None:
        info = self.storage_data[item.storage_index]
        raw: IO[bytes] = io.BufferedReader(_Window(fd, info.offset, info.length))
        stream = self.transforms.transform_load_stream(item, info.transform_descriptors or (), raw)
        fqn = item.storage_index.fqn
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(stream.read()))
            return
        if not stream.seekable():
            stream = io.BytesIO(stream.read())
        try:
            stored = torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises anything from RuntimeError to UnpicklingError
            raise FormatProblem(f"tensor {fqn!r} in {info.relative_path}: {_one_line(exc)}") from None
        md = self.metadata.state_dict_metadata[fqn]
        assert isinstance(md, TensorStorageMetadata)
        chunk = _chunk_at(md, item.storage_index)
        _check_stored(fqn, stored, chunk, md.properties.dtype)
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
            stored = stored.narrow(dim, start, length)
        target = planner.resolve_tensor(item).detach()
        target.copy_(stored)
        planner.commit_tensor(item, target)


def _chunk_at(md: TensorStorageMetadata, index: MetadataIndex) -> ChunkStorageMetadata:
    for c in md.chunks:
        if index.offset is not None and list(c.offsets) == list(index.offset):
            return c
    raise FormatProblem(f"tensor {index.fqn!r}: no chunk at {list(index.offset or [])} in .metadata")


def _check_stored(fqn: str, stored: Any, chunk: ChunkStorageMetadata, dtype: torch.dtype) -> None:
    where = f"tensor {fqn!r}: the stored chunk at {list(chunk.offsets)}"
    if not isinstance(stored, torch.Tensor):
        raise FormatProblem(f"{where} is a {type(stored).__name__}, not a tensor")
    if list(stored.shape) != list(chunk.sizes):
        raise FormatProblem(f"{where} has shape {list(stored.shape)}; .metadata says {list(chunk.sizes)}")
    if stored.dtype != dtype:
        raise FormatProblem(f"{where} is {stored.dtype}; .metadata says {dtype}")


class _SafePlanner(DefaultLoadPlanner):
    """The default planner on a flat state dict, loading objects with weights_only=True."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.state_dict[fqn] = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:  # what weights_only refuses, or a damaged object
            raise FormatProblem(f"object {fqn!r}: {_one_line(exc)}") from None


_PENDING = object()
"""Stands for an object entry until dcp.load fills it in."""


def _batches(meta: Metadata, limit: int) -> Iterator[list[str]]:
    """The metadata's entries in storage order, in groups of at most ``limit`` tensor bytes."""

    def where(fqn: str) -> tuple[str, int]:
        md = meta.state_dict_metadata[fqn]
        offsets = md.chunks[0].offsets if isinstance(md, TensorStorageMetadata) and md.chunks else None
        info = meta.storage_data[MetadataIndex(fqn, offsets)]
        return info.relative_path, info.offset

    batch: list[str] = []
    held = 0
    for fqn in sorted(meta.state_dict_metadata, key=where):
        md = meta.state_dict_metadata[fqn]
        size = _numel(md.size) * md.properties.dtype.itemsize if isinstance(md, TensorStorageMetadata) else 0
        if batch and held + size > limit:
            yield batch
            batch, held = [], 0
        batch.append(fqn)
        held += size
    if batch:
        yield batch


def load_dcp(
    root: Path, directory: str, files: Mapping[str, int], batch_bytes: int = LOAD_BATCH_BYTES
) -> Loaded:
    """Load the DCP checkpoint in ``root/directory`` (``directory`` relative to the restored
    snapshot, "" for its top; ``files``: every restored path with its size), ``batch_bytes`` of
    tensors at a time."""
    base = f"{directory}/" if directory else ""
    meta = read_dcp_metadata(root / base / ".metadata")
    _check_storage(meta, base, files)
    loaded = Loaded()
    for batch in _batches(meta, batch_bytes):
        state: dict[str, Any] = {}
        for fqn in batch:
            md = meta.state_dict_metadata[fqn]
            if isinstance(md, TensorStorageMetadata):
                state[fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            else:
                state[fqn] = _PENDING
        reader = _CheckingReader(root / base if base else root, meta)
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process, as meant
                warnings.simplefilter("ignore")
                dcp_load(state, storage_reader=reader, planner=_SafePlanner(), no_dist=True)
        except CheckpointException as exc:
            raise FormatProblem(reader.problem or _first_failure(exc)) from None
        except Exception as exc:
            raise FormatProblem(reader.problem or f"dcp.load failed: {_one_line(exc)}") from None
        _count(meta, state, loaded)
    return loaded


def _first_failure(exc: CheckpointException) -> str:
    for failure, _ in exc.failures.values():
        if isinstance(failure, FormatProblem):
            return str(failure)
        return f"dcp.load failed: {_one_line(failure)}"
    return f"dcp.load failed: {_one_line(exc)}"


def _count(meta: Metadata, state: Mapping[str, Any], loaded: Loaded) -> None:
    """Every entry of a loaded batch is what .metadata says it is."""
    for fqn, value in state.items():
        md = meta.state_dict_metadata[fqn]
        if isinstance(md, BytesStorageMetadata):
            if value is _PENDING:
                raise FormatProblem(f"object {fqn!r} was not loaded")
            loaded.objects += 1
            continue
        if not isinstance(value, torch.Tensor) or list(value.shape) != list(md.size):
            raise FormatProblem(f"tensor {fqn!r} did not load with shape {list(md.size)}")
        if value.dtype != md.properties.dtype:
            raise FormatProblem(f"tensor {fqn!r} did not load as {md.properties.dtype}")
        loaded.tensors += 1
        loaded.bytes += value.numel() * value.element_size()


# -- safetensors -------------------------------------------------------------------------------


def load_safetensors(root: Path, shards: Mapping[str, set[str]]) -> Loaded:
    """Load every tensor of each of ``shards`` (path relative to ``root`` -> the tensor names an
    index maps to it, which must be in it; empty for a file without an index)."""
    loaded = Loaded()
    unloadable: dict[str, int] = {}
    for shard, expected in sorted(shards.items()):
        with (root / shard).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                start, entries = safetensors_header(f, size)
            except FormatProblem as exc:
                raise FormatProblem(f"{shard}: {exc}") from None
            missing = sorted(expected - {e.name for e in entries})
            if missing:
                raise FormatProblem(
                    f"tensor {missing[0]!r}: the index maps it to {shard}, which does not hold it"
                    + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            for e in sorted(entries, key=lambda e: e.begin):
                dtype = getattr(torch, _SAFETENSORS_TORCH.get(e.dtype, "-"), None)
                if start + e.end > size:
                    raise FormatProblem(
                        f"{shard} is truncated: {size} bytes, "
                        f"tensor {e.name!r} needs bytes up to {start + e.end}"
                    )
                if not isinstance(dtype, torch.dtype):
                    unloadable[e.dtype] = unloadable.get(e.dtype, 0) + 1
                    continue
                _load_tensor(f, shard, start, e, dtype)
                loaded.tensors += 1
                loaded.bytes += e.end - e.begin
    if unloadable:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(unloadable.items()))
        loaded.note = f"tensors of dtypes torch has no type for ({kinds}): sizes checked, not loaded"
    return loaded


def _load_tensor(
    f: io.BufferedReader, shard: str, start: int, e: SafetensorsEntry, dtype: torch.dtype
) -> None:
    buf = bytearray(e.end - e.begin)
    f.seek(start + e.begin)
    if f.readinto(buf) != len(buf):
        raise FormatProblem(f"{shard} is truncated: tensor {e.name!r} ends past the end of the file")
    try:
        flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        tensor = flat.reshape(e.shape)
    except (RuntimeError, ValueError) as exc:
        raise FormatProblem(f"{shard}: tensor {e.name!r} does not load: {_one_line(exc)}") from None
    if tuple(tensor.shape) != e.shape or tensor.dtype != dtype:
        raise FormatProblem(f"{shard}: tensor {e.name!r} loaded as {tensor.dtype}{list(tensor.shape)}")


# -- torch.save ----------------------------------------------------------------------------------


def torch_load(path: Path) -> Loaded:
    """``torch.load(path, weights_only=True)`` on the CPU; FormatProblem if it fails.

    weights_only refuses arbitrary globals, so this does not execute code from the target.
    Zip-form files are memory-mapped, so a checkpoint larger than RAM still loads; a legacy
    (non-zip) file is read whole."""
    with path.open("rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # torch raises anything from RuntimeError to UnpicklingError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatProblem(f"torch.load(weights_only=True) failed: {first}") from None
    loaded = Loaded()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            loaded.tensors += 1
            loaded.bytes += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack += item.values()
        elif isinstance(item, list | tuple):
            stack += item
    return loaded
