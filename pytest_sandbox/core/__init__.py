"""The pure core: specs, limits, units, names, errors, references (stdlib only, no I/O)."""
