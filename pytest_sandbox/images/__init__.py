"""Images: layers, the store, layer tars, OCI archives and registries."""
