"""Serve's choice of a router replica for each `Router.generate` call, made in the caller (the
ingress replica's handle): the router most likely to hold the prompt's prefix in its KV cache,
load as the tie-breaker, capped so a hot conversation cannot overload one router
(cluster/prefix_routing.py decides; this class only feeds it Serve's view).

Loads are Serve's own: the ongoing `generate` calls per router replica (a call lasts as long as
its request), as the handle's queue-length cache holds them; no extra probe per request. The
chosen replica is offered first and the rest, least loaded first, after it: Serve probes and
skips a full or silent one, so a request never waits on its preferred router. The table learns
where each request was actually sent (`on_request_routed`). Serve's private queue-length cache and
replica set are read as Ray's own PrefixCacheAffinityRouter reads them (Ray 2.60).

The replica found for a call is handed to that very call (`_fulfill_next_pending_request`), not
to whichever waiting call carries its ingress request's id, as Serve's base class does: see there.
"""
from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.prefix_routing import PrefixAffinity, prefix_keys
from deployments import metrics


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_size: int = 16, max_imbalance: int = 16, capacity: int = 100_000):
        self._block_size = block_size
        self._affinity = PrefixAffinity(max_imbalance, capacity)

    def _keys(self, pending_request: PendingRequest | None) -> list[bytes]:
        args = pending_request.args if pending_request is not None else ()
        prompt = getattr(args[0], "prompt_ids", None) if args else None
        return prefix_keys(prompt, self._block_size) if prompt else []

    def _loads(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Ongoing requests per replica as this handle last heard (updated with every call it sends);
        unknown counts as idle: Serve probes a replica before it sends anything to it anyway."""
        cached = self._replica_queue_len_cache.get if self._use_replica_queue_len_cache else lambda _: None
        return {r.replica_id.to_full_id_str(): cached(r.replica_id) or 0 for r in replicas}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:  # every replica was considered: back off before asking again
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        loads = self._loads(candidate_replicas)
        choice = self._affinity.choose(self._keys(pending_request), loads)
        metrics.ROUTE_CHOICES.labels(choice.reason).inc()
        by_name = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        first = by_name.pop(choice.router)
        rest = sorted(by_name.values(), key=lambda r: loads[r.replica_id.to_full_id_str()])
        return [[first], rest] if rest else [[first]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Hands `replica` to the call it was chosen for. Serve's base class looks that call up by its
        internal request id, indexed once per id; but every `generate` call an ingress request makes
        inherits that request's id, so of a request's concurrent choices (n > 1, a list of prompts) only
        the first was indexed: the others were never handed a replica, their routing tasks retried
        forever, and once those filled Serve's cap of routing tasks (two per router replica) no later
        request was routed at all. Each call has its own metadata object: match on that."""
        pending = next((p for p in self._pending_requests_to_fulfill
                        if p.metadata is request_metadata and not p.future.done()), None)
        if pending is None:
            return
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        if self._pending_requests_by_id.get(request_metadata.internal_request_id) is pending:
            self._remove_pending_request_from_indices(pending)  # a sibling's entry is not ours to drop

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._affinity.remember(self._keys(pending_request), replica_id.to_full_id_str())

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {r.to_full_id_str() for r in self._replica_id_set} - {r.replica_id.to_full_id_str() for r in replicas}
        super().update_replicas(replicas)
        for name in gone:  # its cache went with it
            self._affinity.forget(name)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._affinity.forget(replica_id.to_full_id_str())
