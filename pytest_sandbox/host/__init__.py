"""One module per kernel interface: syscalls, the root filesystem, the host base, cgroups."""
