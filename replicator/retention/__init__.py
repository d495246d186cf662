"""Retention: which snapshot manifests of a source each target keeps.

* :mod:`replicator.retention.policy`: the policy model (``retention:`` in the config) and the
  pure selection: no I/O, no clock, so every rule is testable on plain data.
* :mod:`replicator.retention.apply`: reading a target's manifests, applying the selection,
  deleting what it drops; used by the daemon after each publish and by ``replicator forget``.

Nothing is imported here: :mod:`replicator.config` imports the policy model, and the apply
module imports the repository (which imports the config).
"""
