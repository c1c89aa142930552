"""A training script with a bug that kills it before the first step: what a circuit breaker is for."""

raise RuntimeError("crash_at_once: the training script fails before its first step")
