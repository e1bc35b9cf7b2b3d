"""The token path from routers to the ingress: one message per engine step per ingress replica.

    router engine thread ──(one call per step)──▶ router event loop ──TokenPublisher──▶
        gRPC client stream (one per ingress replica) ──▶ TokenSink (in the ingress) ──▶ each request's queue

Requests still start, end and fail through the Serve handle call `Router.generate`
(admission, cancellation, errors, a router's death, Serve's queue-length routing and
autoscaling all stay Serve's); only the outputs travel here, batched: a step that
makes 64 streams' tokens is one message, not 64 Ray objects.
"""
