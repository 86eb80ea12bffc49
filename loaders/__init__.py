"""duoserve.loaders."""
