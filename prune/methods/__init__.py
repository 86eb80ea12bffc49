"""Pruning methods, one file each, registered by name (see duoserve.prune.registry)."""
