"""tasks/geo: the geo refresh against the simulator, its concurrency and retries."""
