"""The local-process kit for tests and benchmarks: private redis-servers (and Sentinel and S3 processes),
the program's processes, free ports, readiness, and the fault injector's parts. Not a production package:
no image ships it.

Built on `sdxl_serve.processes` (own process groups, dying with the parent, bounded stops).
"""

from sdxl_serve.processes import ProcessError, RedisOptions, free_port, wait_http
from testkit.procs import ProcessGroup, gateway_args, sdxl_serve_argv, worker_args, write_tiny_model
from testkit.redis import AsyncRedisProcess, RedisProcess, async_redis_process, redis_process

__all__ = [
    "AsyncRedisProcess",
    "ProcessError",
    "ProcessGroup",
    "RedisOptions",
    "RedisProcess",
    "async_redis_process",
    "free_port",
    "gateway_args",
    "redis_process",
    "sdxl_serve_argv",
    "wait_http",
    "worker_args",
    "write_tiny_model",
]
