"""Ray Serve layer: the ingress (HTTP + gRPC APIs, `ingress.py`, `api/`), the routers (backbone,
batching and KV cache, `router.py`), the placement controller (`controller.py`), the expert
workers (`experts/`), the app builder and the CLI.

`cluster/` holds the model and engine and knows nothing of Ray; this package places them.
"""
