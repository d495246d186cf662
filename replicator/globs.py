"""Glob patterns over relative POSIX paths, as used by ``include`` / ``exclude`` and ``--include``.

Rules (documented in README): ``*`` and ``?`` never cross a ``/``; ``**`` matches any
number of whole path segments, including none; ``[abc]`` is a character class. A pattern
with no ``/`` matches a file's name at any depth (``*.tmp``); a pattern with a ``/`` is
anchored at the root (``step-*/model.safetensors``). A pattern also matches everything
below a directory it names (``step-000200`` selects the whole set).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache


def _translate(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            at_start = i == 0 or pattern[i - 1] == "/"
            j = i + 2
            if at_start and j < n and pattern[j] == "/":
                out.append("(?:[^/]+/)*")  # '**/' -> zero or more directories
                i = j + 1
                continue
            out.append(".*")
            i = j
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "^", "]") else i + 1)
            if j == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@lru_cache(maxsize=512)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile one pattern; see the module docstring for its rules."""
    pattern = pattern.strip()
    if not pattern:
        raise ValueError("empty glob pattern")
    anchored = "/" in pattern.rstrip("/")
    pattern = pattern.strip("/") if anchored else pattern.rstrip("/")
    body = _translate(pattern)
    prefix = "" if anchored else "(?:.*/)?"
    # '(?:/.*)?' lets a pattern naming a directory select everything below it. DOTALL and \Z:
    # names may hold newlines, which '.' and '$' would otherwise treat as the end (issue 17:
    # a name with a newline was silently left out by the default include '**').
    return re.compile(f"^{prefix}{body}(?:/.*)?\\Z", re.DOTALL)


class PathFilter:
    """include/exclude selection: a path is selected if it matches an include and no exclude."""

    def __init__(self, include: Iterable[str] = ("**",), exclude: Iterable[str] = ()) -> None:
        self.include = tuple(include) or ("**",)
        self.exclude = tuple(exclude)
        # Compiled once (this also fails early on a bad pattern): the filter runs per file.
        self._include = [compile_glob(p) for p in self.include]
        self._exclude = [compile_glob(p) for p in self.exclude]

    def __call__(self, path: str) -> bool:
        return any(p.match(path) for p in self._include) and not any(p.match(path) for p in self._exclude)
