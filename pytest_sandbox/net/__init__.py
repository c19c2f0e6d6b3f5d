"""Private networks: netlink (pyroute2), the network thread, subnets, published ports."""
