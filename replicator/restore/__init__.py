"""Restore: a snapshot's files back, byte-identical, each appearing atomically, into a place a
training job can read.

    run        `replicator restore`: open the repository, pick the snapshot (an id, 'latest'
               or the newest at a time), open the destination, restore
    core       the algorithm over any destination: which files, what is already correct,
               reading chunks (packed ones together), bounded memory, one failure per file;
               the Destination protocol
    local      a destination directory: safe directory walking, temporary files, and
               durability by one syncfs at the end (sync_file_range writes behind)
    s3         a destination that is a bucket (each file a plain object)

Every path is checked again by each destination (a manifest from a target is untrusted), and
nothing is ever written through a symbolic link or outside the destination.
"""
