"""splicelb: a multi-process, kernel-assisted load balancer for WebSocket and TCP traffic."""

__version__ = "0.1.0"
