"""Which Serve replica this process is: the id routers and ingress replicas report under."""
from __future__ import annotations

import uuid

from ray import serve


def replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests)
        return uuid.uuid4().hex[:8]
