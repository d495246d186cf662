"""What runs inside a small-file helper process (:mod:`replicator.read.helpers` starts them).

A helper imports only this, :mod:`replicator.read.encode` and the file system source: no asyncio
pipeline, no pydantic. It starts in ~0.1 s instead of ~0.25 s, and two of them starting
during a scan take less of the CPU the scan needs.

It serves one socket: each request is a frame holding a pickled ``(coder, source, files)``,
each reply a frame holding the pickled results, in order. A frame is an 8-byte little-endian
length and that many bytes. The end of the socket ends the helper: the parent closed it, or
died (its end is closed by the kernel, and nobody else holds it).
"""

from __future__ import annotations

import pickle
import signal
import socket
import struct

from replicator.errors import SourceError
from replicator.read.encode import ChunkCoder, SmallFile
from replicator.sources.base import Source, SourceFile

FRAME = struct.Struct("<Q")

Request = tuple[ChunkCoder, Source, list[SourceFile]]
"""A batch to read: the coder (hash specs, chunk sizes, encoder settings), the source, its files."""
Reply = list[SmallFile | SourceError]
"""Per file of the batch, in order: the file read and encoded, or why it was not read."""


def serve(sock: socket.socket) -> None:
    """The helper's main loop (the target of its process)."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops the helpers; a
    # helper would only print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    coder: ChunkCoder | None = None  # kept while the parent sends an equal one: its compressors are reused
    with sock:
        while (frame := receive_frame(sock)) is not None:
            sent, source, files = pickle.loads(frame)
            if coder != sent:
                coder = sent
            try:
                sock.sendall(encode_frame(coder.read_whole(source, files)))
            except OSError:  # BrokenPipeError, ConnectionResetError: the parent is gone
                return


def encode_frame(obj: object) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(body)) + body


def receive_frame(sock: socket.socket) -> bytearray | None:
    """The next frame's body (blocking), or None at the end of the stream."""
    header = _receive_exactly(sock, FRAME.size)
    return None if header is None else _receive_exactly(sock, FRAME.unpack(header)[0])


def _receive_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except OSError:
            return None
        if not k:
            return None
        got += k
    return buf
