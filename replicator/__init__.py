"""replicator: keeps ML training state portable.

The package reads like the pipeline (see README "How it works"):

    sources -> gate (consistency) -> chunking / codec -> fanout (per-target queues)
            -> targets -> repository (chunks, manifests, refs)

with verify, restore, rpo, budget and the daemon around it.
"""

__version__ = "0.1.0"
