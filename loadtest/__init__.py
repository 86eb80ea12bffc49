"""duoserve.loadtest."""
