"""lb control plane: desired state, reconciler, CLI."""
