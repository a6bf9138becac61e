"""lb: an inference-aware load-balancing reverse proxy for pools of AI model servers."""

from lb.native import activate

__version__ = "0.1.0"

# Runs before any other module of the package loads: a fresh compiled build of the data plane
# takes precedence over the sources (lb/native.py).
activate(__path__)
