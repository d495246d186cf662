"""What a self-describing checkpoint says its set holds: the ``needs`` of a part.

A torch.distributed.checkpoint ``.metadata`` names every storage file and the byte ranges it
uses; a ``*.safetensors.index.json`` names every shard. Whichever instance holds such a file
reads it from its own source and puts the list in its part, so the assembler can tell a set
whose last shard is missing or still short from a complete one, whoever holds the shards.
The parsing is the restore drill's (:mod:`replicator.verify.formats`): pickles are read
without executing anything.
"""

from __future__ import annotations

import io

from replicator.verify.formats import PICKLE_LIMIT, dcp_needs, safetensors_index_needs

MAX_DESCRIPTION = PICKLE_LIMIT


def describes(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name == ".metadata" or name.endswith(".safetensors.index.json")


def needs(path: str, data: bytes) -> dict[str, int]:
    """Path (next to ``path``) -> the size it must have at least. FormatProblem if the file does
    not parse: a describing file that is torn or foreign names nothing."""
    read = dcp_needs if path.rsplit("/", 1)[-1] == ".metadata" else safetensors_index_needs
    return read(io.BytesIO(data), len(data), path)
