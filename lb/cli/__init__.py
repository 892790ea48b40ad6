"""lbctl: one module per subcommand (`maps`, `trace`, `run`), the node flags
they share (`nodeflags`), and kubectl-style output (`table`)."""
