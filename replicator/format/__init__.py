"""The repository format's objects, as docs/FORMAT.md specifies them.

    chunks     a chunk object's bytes: codec byte, zstd or byte-grouped zstd, and decoding
               them back (the read stage encodes, restore and verify decode)
    manifest   snapshot manifests: the model, their encoding, and parsing untrusted ones

The layout of objects on a target and the write order are replicator.repository's.
Nothing is imported here: the small-file helper processes import ``format.chunks`` alone.
"""
