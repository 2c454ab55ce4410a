"""csnap's test suite: unit, property, model, crash-state, torture and real-process tests."""
