"""The kinds of lens: the `Lens` base and the tuned lens, the Jacobian lens, their files, loading by name,
the shipped catalog and the hub."""
