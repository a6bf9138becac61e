"""lb: an inference-aware load-balancing reverse proxy for pools of AI model servers."""

__version__ = "0.1.0"
