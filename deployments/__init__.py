"""Ray Serve layer: expert workers, the router (HTTP + gRPC APIs), the app builder and the CLI.

`cluster/` holds the model and engine and knows nothing of Ray; this package places them.
"""
