"""The worker: a warmed, compiled, data-parallel SDXL pipeline fed from the Redis job stream."""
