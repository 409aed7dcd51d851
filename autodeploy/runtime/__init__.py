"""Runtime: cache pools, raw batch inputs, the engine and its scheduler."""
