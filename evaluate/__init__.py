"""The evaluate stage and the predict command, imported as ``samadapt.evaluate`` (inference, metrics: the core)."""
