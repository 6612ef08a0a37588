"""Real local servers for tests, the demo and benchmarks (not for production)."""

from .servers import EtcdCluster, EtcdServer, RedisServer, free_port

__all__ = ["EtcdCluster", "EtcdServer", "RedisServer", "free_port"]
