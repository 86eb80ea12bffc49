"""duoserve.kernels."""
