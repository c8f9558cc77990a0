"""``edgesmith serve``: an Open Inference Protocol v2 server (KServe/Triton REST) for one model.

``server`` (the :class:`Server`: model slot, hot swap, the process), ``app`` (the HTTP routes),
``oip`` and ``oipjson`` (decoding and checking requests, encoding responses), ``batching``
(the micro-batcher) and ``metrics`` (Prometheus).
"""

from edgesmith.runtime.serve.server import ServeConfig, Server

__all__ = ["ServeConfig", "Server"]
