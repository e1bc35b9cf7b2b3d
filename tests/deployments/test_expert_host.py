"""One ExpertHost for every worker kind, built from a WorkerSpec, in this process (no Ray): the spec's
dtype and copies are honoured, it serves what it holds on both transports, and loads, retires and
reports copies over gRPC; the Serve replica and the app build theirs from the same spec."""
import asyncio

import pytest
import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from deployments import app
from deployments.config import app_config
from deployments.experts import transport as transports
from deployments.experts import worker
from deployments.experts.host import ExpertHost, WorkerSpec
from deployments.experts.transport.grpc import GrpcTransport
from tests.deployments.helpers import SECRET


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return str(checkpoint_factory("mixtral"))


@pytest.fixture
def host(model):
    h = ExpertHost(WorkerSpec(model=model, secret=SECRET, experts=((0, 0), (0, 1)), name="w",
                                torch_threads=torch.get_num_threads()), node_id="node-a")
    yield h
    h.stop()


def test_a_host_serves_its_copies_on_every_transport(host, model):
    ckpt, family, cfg = open_model(model)
    oracle = LocalExperts(load_experts(ckpt, family, cfg, [(0, 0), (0, 1)]))
    ref = host.ref()
    assert (ref.address, ref.node_id, ref.local_socket, ref.device) == (
        f"127.0.0.1:{host.port}", "node-a", host.local.path, "cpu")
    x = torch.randn(5, cfg.hidden_size)
    expected = oracle.run_subset(0, x, [0, 1], [3, 2])
    for prefer in ("shm", "grpc"):
        t = transports.connect(ref, node_id="node-a", device="cpu", secret=SECRET, prefer=prefer)
        assert torch.equal(t.forward(0, x, [0, 1], [3, 2], 30), expected), prefer
        t.close()


def test_copies_are_loaded_retired_and_reported_through_the_host(host):
    grpc = GrpcTransport(host.address, SECRET)
    assert sorted(grpc.health()) == [(0, 0), (0, 1)]
    assert grpc.load_copies([(0, 1), (1, 2)]) > 0  # only (1, 2) is read
    assert grpc.load_copies([(1, 2)]) == 0
    grpc.retire([(0, 0)])
    assert sorted(grpc.health()) == sorted(host.held()) == [(0, 1), (1, 2)]


def test_the_spec_s_dtype_reaches_the_weights(model):
    threads = torch.get_num_threads()
    h = ExpertHost(WorkerSpec(model=model, secret=SECRET, experts=((1, 3),), dtype="bfloat16", torch_threads=3))
    try:
        assert h.dtype == torch.bfloat16 and torch.get_num_threads() == 3
        assert {(w.gate_up.dtype, w.down.dtype) for w in h.experts.experts.values()} == {(torch.bfloat16,) * 2}
        assert h.ref().node_id == ""  # not told: no node
    finally:
        h.stop()
        torch.set_num_threads(threads)


def test_the_serve_replica_builds_its_host_from_the_app_s_spec(model, monkeypatch):
    threads = torch.get_num_threads()
    cfg = app_config({"model": model, "num_workers": 2, "dtype": "float16", "worker": {"torch_threads": threads}})
    spec = app.spec_of(cfg)
    ws = app.worker_spec(spec, "expert-worker-1", spec.placement.workers[1])
    assert ws == WorkerSpec(model=model, secret=spec.data_plane_secret, name="expert-worker-1",
                            experts=tuple(tuple(e) for e in spec.placement.workers[1]), host=cfg.data_plane_host,
                            device="cpu", dtype="float16", torch_threads=threads, service_time_per_token_s=0.0)
    monkeypatch.setattr(worker.ray, "get_runtime_context",
                        lambda: type("Ctx", (), {"get_node_id": lambda self: "node-b"})())
    replica = worker.ExpertWorker(spec=ws)
    try:
        endpoints = replica.get_endpoints()
        assert endpoints["node_id"] == "node-b" and endpoints["address"] == replica.host.address
        assert sorted(replica.host.held()) == sorted(ws.experts) and replica.host.dtype == torch.float16
        replica.check_health()
    finally:
        replica.host.stop()


# Serve awaits a replica's async __del__ (the hand-back); a test's garbage collector only calls it
@pytest.mark.filterwarnings("ignore:coroutine 'ExpertPoolWorker.__del__' was never awaited")
def test_a_pool_replica_starts_empty_registers_its_endpoints_and_reports_busy_time(model, monkeypatch):
    registered = []

    class Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args):
            registered.append((self.name, args))
            future = asyncio.get_running_loop().create_future()
            future.set_result(1)
            return future

    controller = type("Controller", (), {"register_worker": Method("register"), "unregister_worker": Method("leave")})
    monkeypatch.setattr(worker.ray, "get_runtime_context",
                        lambda: type("Ctx", (), {"get_node_id": lambda self: "node-c"})())
    replica = worker.ExpertPoolWorker(WorkerSpec(model=model, secret=SECRET, name="expert-pool",
                                                 torch_threads=torch.get_num_threads()),
                                      controller=controller(), build_id="b1", target_busy=0.5)
    try:
        assert replica.host.held() == []
        stats = asyncio.run(replica.record_autoscaling_stats())
        assert stats["target_busy"] == 0.5 and 0 <= stats["busy"] <= 1
        assert registered == [("register", (replica.host.endpoints(), "b1"))] and replica.registered
        assert replica.host.endpoints()["node_id"] == "node-c"
    finally:
        replica.host.stop()
        replica.registered = False  # nothing to hand back when the test drops it


def test_an_old_client_s_load_still_loads_copies(host):
    """The RPC was renamed LoadCopies (expert load is traffic); `Load` stays on the wire as its alias."""
    import grpc as grpc_lib

    from protos import expert_pb2, expert_pb2_grpc
    from deployments.experts.auth import call_metadata

    stub = expert_pb2_grpc.ExpertServiceStub(grpc_lib.insecure_channel(host.address))
    request = expert_pb2.ExpertsRequest(layer=[1], expert_id=[2])
    assert stub.Load(request, timeout=60, metadata=call_metadata(SECRET)).bytes_loaded > 0
    assert stub.LoadCopies(request, timeout=60, metadata=call_metadata(SECRET)).bytes_loaded == 0  # held now
    assert (1, 2) in host.held()
