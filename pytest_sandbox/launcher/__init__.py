"""The launcher: the per-pytest-process fork server that creates containers (stdlib only)."""
