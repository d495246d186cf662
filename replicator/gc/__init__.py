"""Garbage collection: ``replicator prune`` deletes chunk objects and packs that no snapshot
manifest references, in two phases that are safe against crashes and concurrent writers
(docs/FORMAT.md section 10). :mod:`.protocol` holds the objects under ``gc/`` and the
writer's rule, :mod:`.mark` what the manifests reference, :mod:`.prune` the collector."""
