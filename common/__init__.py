"""Code shared by the gateway and the workers: configuration, schemas, Redis keys, the queue."""
