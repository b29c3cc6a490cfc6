"""Shared parts every step uses: errors, paths, the atomic writer, display helpers, plots, statistics, the run
configuration and the model registry."""
