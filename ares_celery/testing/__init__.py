"""Real local servers for tests, the demo and benchmarks (not for production)."""

from .rabbitmq import RabbitMQServer
from .servers import EtcdCluster, EtcdServer, RedisServer, free_port

__all__ = ["EtcdCluster", "EtcdServer", "RabbitMQServer", "RedisServer",
           "free_port"]
