"""The Router deployment's Serve request router, in process (no Ray cluster): what it offers Serve for
a request, what it learns from where Serve sent it, and what it forgets when a router goes."""
import asyncio

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from cluster.engine import SamplingParams
from deployments.messages import GenerateRequest
from deployments.prefix_router import PrefixAffinityRouter

DEPLOYMENT = DeploymentID(name="router", app_name="moe")


class Replica:
    """What the request router reads of a running replica."""
    max_ongoing_requests = 100
    node_id, availability_zone, multiplexed_model_ids = "n", None, set()

    def __init__(self, name: str):
        self.replica_id = ReplicaID(name, DEPLOYMENT)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _request(prompt: list[int]) -> PendingRequest:
    return PendingRequest(args=[GenerateRequest(prompt, SamplingParams(max_tokens=1))], kwargs={},
                          metadata=RequestMetadata(request_id="r", internal_request_id=str(len(prompt))))


def test_a_later_turn_is_offered_to_the_router_that_took_the_earlier_one_first():
    async def run():
        router = PrefixAffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
        router.initialize_state(block_size=4, max_imbalance=2)
        a, b = Replica("a"), Replica("b")
        router.update_replicas([a, b])
        turn1, turn2 = list(range(1, 10)), list(range(1, 10)) + [50, 51, 52, 53]
        ranks = await router.choose_replicas([a, b], _request(turn1))
        assert [len(r) for r in ranks] == [1, 1]  # the preferred one first, the rest after it
        took = b if ranks[0][0] is a else a  # Serve may send it elsewhere (the first was full): it learns that
        router.on_request_routed(_request(turn1), took.replica_id, None)
        assert (await router.choose_replicas([a, b], _request(turn2)))[0] == [took]
        for _ in range(3):  # 3 more ongoing requests than the other: past the cap
            router.on_send_request(took.replica_id)
        assert (await router.choose_replicas([a, b], _request(turn2)))[0] != [took]
        router.on_replica_actor_died(took.replica_id)
        assert not router._affinity.table
        assert (await router.choose_replicas([a], _request([7]))) == [[a]]  # shorter than a block: any router

    asyncio.run(run())


def test_concurrent_choices_of_one_request_each_get_their_own_router():
    """A request's choices (n > 1, a list of prompts) are concurrent `generate` calls from one ingress
    request, so Serve gives them all that request's internal id: each must still be sent, to the router
    chosen for its own prompt, and later requests after them (they once all hung: issue 21)."""
    async def run():
        router = PrefixAffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
        router.initialize_state(block_size=4)
        a, b = Replica("a"), Replica("b")
        router.update_replicas([a, b])
        prompts = [[i] * 5 for i in range(1, 6)]
        owners = [a, b, b, a, b]
        for prompt, owner in zip(prompts, owners):  # earlier turns of these conversations went there
            router.on_request_routed(_request(prompt), owner.replica_id, None)
        pending = [PendingRequest(args=[GenerateRequest(p, SamplingParams(max_tokens=1))], kwargs={},
                                  metadata=RequestMetadata(request_id="r", internal_request_id="one"))
                   for p in prompts]
        # A hang guard only: each choice is answered at once when routing works.
        chosen = await asyncio.wait_for(asyncio.gather(*map(router._choose_replica_for_request, pending)), 10)
        assert chosen == owners
        later = await asyncio.wait_for(router._choose_replica_for_request(_request([9] * 8)), 10)
        assert later in (a, b)

    asyncio.run(run())
