"""The HTTP gateway: validates requests, queues jobs on Redis, answers with the workers' results."""
