"""Balancing strategies: the interface, the built-in algorithms and the registry naming them."""

from lb.strategies.base import RequestInfo, Strategy
from lb.strategies.latency_weighted import LatencyWeighted
from lb.strategies.least_connections import LeastConnections
from lb.strategies.registry import BUILTIN, build, resolve
from lb.strategies.round_robin import RoundRobin

__all__ = [
    "BUILTIN",
    "LatencyWeighted",
    "LeastConnections",
    "RequestInfo",
    "RoundRobin",
    "Strategy",
    "build",
    "resolve",
]
