"""Services: the node's desired state computed from a Cluster (`desired`,
pure), and the reconciler that writes only its differences into the maps
(`reconcile`, with its id `allocators` and the `maglev` tables)."""
