"""Relative paths: the safety check every path from a source, a manifest or a restore passes,
and how a path is shown on one line.

Paths are Python ``str`` in the *surrogateescape* convention (what ``os.fsdecode`` and
``os.walk`` on str paths give): a name that is not valid UTF-8 keeps its exact bytes, each
undecodable byte as a code point U+DC80..U+DCFF, and every ``os`` call encodes it back to the
same bytes. POSIX names are bytes (issue 17): anything but NUL and ``/``, at most 255 bytes
per segment; limits are therefore counted in encoded bytes.

In a module of its own (no pydantic) because the small-file helper processes need it too.
"""

from __future__ import annotations

import re

MAX_SEGMENT_BYTES = 255
"""NAME_MAX of Linux file systems."""
MAX_PATH_BYTES = 4096
"""PATH_MAX: the longest path a single system call takes."""

_BAD_SEGMENT = re.compile(r"(?:^|/)\.{0,2}(?:/|\Z)")
"""An empty, ``.`` or ``..`` path segment."""
_LONG_SEGMENT = re.compile(f"[^/]{{{MAX_SEGMENT_BYTES + 1}}}")
_LONG_RAW_SEGMENT = re.compile(_LONG_SEGMENT.pattern.encode())


def encode_path(path: str) -> bytes:
    """The exact bytes of a path (``os.fsencode`` on POSIX, without the lookup of the
    file system encoding per call)."""
    return path.encode("utf-8", "surrogateescape")


def decode_path(raw: bytes) -> str:
    """The str form of a path's bytes (``os.fsdecode`` on POSIX)."""
    return raw.decode("utf-8", "surrogateescape")


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise ValueError.

    Safe: not empty, not absolute, no NUL, no empty, ``.`` or ``..`` segment, each segment at
    most 255 bytes and the whole at most 4096 bytes once encoded. Newlines, tabs, backslashes,
    other control characters and leading dashes are allowed: POSIX allows them, and restore
    writes through directory descriptors, where none of them can change which file is meant.
    """
    if not path:
        raise ValueError("path is empty")
    if path[0] == "/":
        raise ValueError(f"absolute path {path!r}")
    if "\x00" in path:
        raise ValueError(f"path {path!r} contains NUL")
    if _BAD_SEGMENT.search(path):
        raise ValueError(f"path {path!r} has an empty, '.' or '..' segment")
    if path.isascii():  # O(1) in CPython: most paths need no encoding to be measured
        raw_len = len(path)
        if raw_len > MAX_SEGMENT_BYTES and _LONG_SEGMENT.search(path):
            raise ValueError(f"path {display_path(path)} has a segment longer than 255 bytes")
    else:
        try:
            raw = encode_path(path)
        except UnicodeEncodeError:
            raise ValueError(f"path {path!r} holds a surrogate that stands for no byte") from None
        if raw.decode("utf-8", "surrogateescape") != path:
            # Escaped bytes that form valid UTF-8: two strs would name the same file.
            raise ValueError(f"path {path!r} is not in canonical surrogateescape form")
        raw_len = len(raw)
        if raw_len > MAX_SEGMENT_BYTES and _LONG_RAW_SEGMENT.search(raw):
            raise ValueError(f"path {display_path(path)} has a segment longer than 255 bytes")
    if raw_len > MAX_PATH_BYTES:
        raise ValueError(f"path is {raw_len} bytes long (at most {MAX_PATH_BYTES})")
    return path


def _escape(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:
        return f"\\x{o - 0xDC00:02x}"  # the undecodable byte itself
    if ch in "\\'":
        return "\\" + ch
    if ch.isprintable():
        return ch
    return repr(ch)[1:-1]  # \n, \t, \x07, \u2028, \ud800, ...


def display_path(path: str) -> str:
    """``path`` for a log line or terminal: as it is if it is printable and holds no backslash
    or quote; otherwise quoted the way bash's ``$'...'`` and GNU ``ls`` do (``$'\\xff\\xfe.bin'``,
    ``$'new\\nline'``). One line, encodable in any UTF-8 stream, never ambiguous, and it can be
    pasted into a shell."""
    if path.isprintable() and "\\" not in path and "'" not in path:
        return path
    return "$'" + "".join(map(_escape, path)) + "'"


def one_line(text: str) -> str:
    """A message for one line of output: ``text`` as it is if it is printable, else quoted
    like :func:`display_path` (a message carrying a name with a newline or a raw byte)."""
    return text if text.isprintable() else display_path(text)
