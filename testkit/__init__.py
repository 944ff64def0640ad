"""The local-process kit for tests and benchmarks: real redis-server, Sentinel and S3 processes on free ports."""
