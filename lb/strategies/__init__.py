"""Balancing strategies: the interface, the built-in algorithms and the registry naming them."""

from lb.strategies.base import RequestInfo, Strategy
from lb.strategies.cache_aware import CacheAware
from lb.strategies.consistent_hash import ConsistentHash
from lb.strategies.latency_weighted import LatencyWeighted
from lb.strategies.least_connections import LeastConnections
from lb.strategies.least_loaded import LeastLoaded
from lb.strategies.registry import BUILTIN, build, resolve
from lb.strategies.round_robin import RoundRobin

__all__ = [
    "BUILTIN",
    "CacheAware",
    "ConsistentHash",
    "LatencyWeighted",
    "LeastConnections",
    "LeastLoaded",
    "RequestInfo",
    "RoundRobin",
    "Strategy",
    "build",
    "resolve",
]
