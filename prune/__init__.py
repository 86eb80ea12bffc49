"""duoserve.prune."""
