"""The expert data plane without Ray, on every CPU transport (gRPC, shared memory): copies, copy
choice, failover, table swaps, healing (with generations), authentication and request validation."""
import asyncio
import functools
import os
import socket
import time

import grpc
import numpy as np
import pytest

from cluster.copy_choice import NoLiveCopy, choose_copies, split
from cluster.engine import LLMEngine, SamplingParams
from cluster.loader import open_model
from cluster.placement import Placement, Table, WorkerRef, round_robin
from deployments.experts.remote import ExpertUnavailable, RemoteExperts
from deployments.experts.transport.grpc import GrpcTransport
from deployments.experts.transport import local_socket
from deployments.experts.transport.local_socket import MODE_SHM, STATUSES, CallFailed, ForwardHeader
from deployments.experts.transport.shm import ShmTransport, shared_buffer
from deployments.membership import Membership
from protos import expert_pb2, expert_pb2_grpc
from tests.deployments.helpers import HERE, KINDS, SECRET, connect, start_worker, worker_ref

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33], [100, 3], list(range(3, 40, 2)), [7, 7, 7, 7, 8]]


def _engine(model, placement, procs, nodes=None, kind="grpc", **kw):
    refs = tuple(worker_ref(p, n) for p, n in zip(procs, nodes or [HERE] * len(procs)))
    remote = RemoteExperts(Table(1, placement, refs), functools.partial(connect, kind=kind), **kw)
    engine = LLMEngine.from_pretrained(model, experts=remote, max_num_seqs=8, max_model_len=128)
    used = [remote.transports.get(w, ref) for w, ref in enumerate(refs) if ref.node_id == HERE]
    assert all(isinstance(t, KINDS[kind]) for t in used)  # the transport under test is the one in use
    return engine, remote, refs


def _expected(model):
    return [o.token_ids for o in LLMEngine.from_pretrained(model).generate(PROMPTS, PARAMS)]


def test_split_is_even_and_contiguous():
    assert split(10, 7, 3) == [(10, 3), (13, 2), (15, 2)]
    assert split(0, 1, 2) == [(0, 1), (1, 0)]


@pytest.mark.parametrize("rule,expected", [
    ("even", {0: [(0, 0, 2), (1, 4, 1)], 1: [(0, 2, 2), (1, 5, 1)]}),
    ("least_loaded", {0: [(0, 0, 4)], 1: [(1, 4, 2)]}),
])
def test_copy_choice_rules(rule, expected):
    copies = Placement((((0, 0), (0, 1)), ((0, 0), (0, 1)))).copies()
    assert choose_copies(0, [4, 2], copies, down=set(), same_node=frozenset(), rule=rule) == expected
    # a copy on the router's node wins either way; a down worker is never chosen
    assert choose_copies(0, [4, 2], copies, down=set(), same_node=frozenset({1}), rule=rule) == \
        {1: [(0, 0, 4), (1, 4, 2)]}
    assert choose_copies(0, [4, 2], copies, down={1}, same_node=frozenset({1}), rule=rule) == \
        {0: [(0, 0, 4), (1, 4, 2)]}
    with pytest.raises(NoLiveCopy):
        choose_copies(0, [4, 2], copies, down={0, 1}, same_node=frozenset(), rule=rule)


@pytest.mark.parametrize("split_rule", ["even", "least_loaded"])
def test_copies_share_rows_and_output_is_unchanged(checkpoint_factory, workers, kind, split_rule):
    """Concurrent requests of different lengths (prefill and decode rows in one call)."""
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.experts()), tuple(cfg.experts())))  # every expert twice
    engine, remote, _ = _engine(model, both, workers(model, both.workers), kind=kind, copy_choice=split_rule)
    assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == _expected(model)
    assert remote.stats.snapshot()["calls"] > 0


def test_killed_worker_with_a_second_copy_loses_no_request(checkpoint_factory, workers, kind):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.experts()), tuple(cfg.experts())))
    procs = workers(model, both.workers)
    reported = []
    engine, remote, _ = _engine(model, both, procs, kind=kind, on_down=lambda w, g: reported.append((w, g)))
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    seqs = {rid: engine.scheduler.find(rid) for rid in ids}
    for _ in range(3):
        engine.step()
    procs[1].kill()
    procs[1].wait()
    while engine.has_unfinished():
        engine.step()
    assert [seqs[rid].output_ids for rid in ids] == _expected(model)
    assert remote.stats.failovers > 0 and reported == [(1, 0)] and remote.down_workers() == [(1, 0)]


def test_killed_worker_without_a_copy_fails_clearly(checkpoint_factory, workers, kind):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    placement = round_robin(cfg.experts(), 2)
    procs = workers(model, placement.workers)
    engine, remote, _ = _engine(model, placement, procs, kind=kind)
    procs[0].kill()
    procs[0].wait()
    with pytest.raises(RuntimeError, match="no other live copy answered"):
        engine.generate(PROMPTS[:1], PARAMS)
    assert remote.uncovered()  # readiness sees it
    t0 = time.monotonic()  # while it is down, new work fails at once: a clear error, not a hang
    with pytest.raises(ExpertUnavailable, match="no live copy"):
        engine.generate(PROMPTS[:1], PARAMS)
    assert time.monotonic() - t0 < 5


def test_table_swap_mid_generation_happens_at_step_boundaries(checkpoint_factory, workers):
    model = str(checkpoint_factory("qwen2_moe"))
    _, _, cfg = open_model(model)
    one, both = round_robin(cfg.experts(), 2), Placement((tuple(cfg.experts()),) * 2)
    engine, remote, ports = _engine(model, both, workers(model, both.workers))
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    seqs = {rid: engine.scheduler.find(rid) for rid in ids}
    step, table = 0, remote.table
    while engine.has_unfinished():
        table = table.changed(one if step % 2 == 0 else both)
        remote.adopt(table)
        assert remote.table.version == table.version - 1  # not before the next step starts
        engine.step()
        assert remote.table.version == table.version
        step += 1
    assert [seqs[rid].output_ids for rid in ids] == _expected(model)


def test_local_copies_are_preferred(checkpoint_factory, workers):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.experts()), tuple(cfg.experts())))
    engine, remote, _ = _engine(model, both, workers(model, both.workers), nodes=["node-a", "node-b"],
                                node_id="node-b")
    engine.generate(PROMPTS, PARAMS)
    calls = remote.stats.snapshot()["calls_per_worker"]
    assert calls.get("0", 0) == 0 and calls["1"] > 0


def test_timed_out_call_is_retried_on_another_copy(checkpoint_factory, workers, kind):
    """Worker 0 is a 'device' far slower than the call deadline: its rows go to worker 1. Only the ratio
    matters (60 s per row against a 5 s deadline), so a slow first call on a loaded machine cannot
    trip the fast worker too."""
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.experts()), tuple(cfg.experts())))
    slow = workers(model, both.workers[:1], "--service-time-per-token", "60")
    fast = workers(model, both.workers[1:])
    engine, remote, _ = _engine(model, both, slow + fast, kind=kind, call_timeout_s=5)
    try:
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == _expected(model)
        stats = remote.stats.snapshot()
        assert stats["failures"].get("DEADLINE_EXCEEDED", 0) >= 1 and stats["failovers"] >= 1
    finally:
        remote.close()


def test_replaced_worker_is_healed_with_a_new_generation(checkpoint_factory, workers, kind):
    """The controller's healing: a replacement (new address, started empty) loads the table's experts;
    the router uses it again, over a fresh transport, once it adopts the table with the worker's new
    generation."""
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.experts()), tuple(cfg.experts())))
    procs = workers(model, both.workers)
    engine, remote, refs = _engine(model, both, procs, kind=kind)
    try:
        old = remote.transports.get(0, refs[0])
        procs[0].kill()
        procs[0].wait()
        engine.generate(PROMPTS[:1], PARAMS)  # served by worker 1 alone
        assert remote.down_workers() == [(0, 0)] and remote.uncovered() == []
        replacement = worker_ref(workers(model, [[]])[0])  # "Serve's replacement", empty
        healed = asyncio.run(Membership([], SECRET).heal(0, replacement, list(both.workers[0])))
        assert healed.generation == 1 and healed.local_socket == replacement.local_socket
        assert sorted(GrpcTransport(healed.address, SECRET).health()) == sorted(both.workers[0])
        remote.adopt(remote.table.changed(workers=(healed, remote.table.workers[1])))
        before = remote.stats.snapshot()["calls_per_worker"].get("0", 0)
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == _expected(model)
        assert remote.stats.snapshot()["calls_per_worker"]["0"] > before and remote.uncovered() == []
        fresh = remote.transports.get(0, healed)
        assert fresh is not old and isinstance(fresh, KINDS[kind])
    finally:
        remote.close()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """A worker holding every expert of a mixtral checkpoint, shared by the refusal tests (each
    also checks that it still serves afterwards)."""
    from tools.checkpoints import make_checkpoint

    model = str(make_checkpoint("mixtral", tmp_path_factory.mktemp("one-worker")))
    _, _, cfg = open_model(model)
    proc = start_worker(model, cfg.experts())
    try:
        yield worker_ref(proc), cfg
    finally:
        proc.kill()
        proc.wait()


def _still_serves(ref: WorkerRef, cfg, kind: str) -> None:
    import torch

    out = connect(ref, kind).forward(0, torch.ones(2, cfg.hidden_size), [0, 1], [1, 1], 10)
    assert out.shape == (2, cfg.hidden_size) and torch.isfinite(out).all()


def _forward(layer, rows: int, hidden: int, ids, counts, dtype="float32", nbytes=None):
    data = np.zeros((rows, hidden), np.float32).tobytes() if nbytes is None else b"\0" * nbytes
    return expert_pb2.ForwardRequest(layer=layer, hidden=expert_pb2.Tensor(data=data, shape=[rows, hidden],
                                                                           dtype=dtype),
                                     expert_id=ids, count=counts)


def test_grpc_refuses_callers_without_the_secret(one_worker):
    ref, cfg = one_worker
    for secret in (None, "wrong"):
        stub = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(ref.address))
        metadata = () if secret is None else (("moe-data-plane-secret", secret),)
        stream = iter([expert_pb2.ForwardChunk(header=_forward(0, 1, cfg.hidden_size, [0], [1]))])
        for method, req in ((stub.Retire, expert_pb2.ExpertsRequest(layer=[0], expert_id=[0])),
                            (stub.Load, expert_pb2.ExpertsRequest(layer=[0], expert_id=[0])),
                            (stub.Health, expert_pb2.HealthRequest()),
                            (stub.Forward, _forward(0, 1, cfg.hidden_size, [0], [1])),
                            (lambda r, **kw: list(stub.ForwardStream(r, **kw)), stream)):
            with pytest.raises(grpc.RpcError) as e:
                method(req, timeout=10, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(GrpcTransport(ref.address, SECRET).health()) == len(cfg.experts())  # nothing was retired


def test_shm_refuses_callers_without_the_secret(one_worker):
    """A caller on this account without the secret is refused before any request is read,
    whatever it sends."""
    import torch

    ref, cfg = one_worker
    for secret in ("", "wrong"):
        with pytest.raises(CallFailed, match="UNAUTHENTICATED"):
            ShmTransport(ref.address, ref.local_socket, secret).forward(0, torch.ones(1, cfg.hidden_size), [0],
                                                                        [1], 10)
    header = ForwardHeader(0, 1, cfg.hidden_size, "float32", 4 * cfg.hidden_size, (0,), (1,)).pack()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as stranger:  # skips the handshake
        stranger.settimeout(10)
        stranger.connect(local_socket.sockaddr(ref.local_socket))
        stranger.recv(1 << 16)  # the challenge
        stranger.send(header)
        assert STATUSES[stranger.recv(1 << 16)[0]] == "UNAUTHENTICATED"
        assert stranger.recv(1 << 16) == b""  # and disconnected
    _still_serves(ref, cfg, "shm")


@pytest.mark.skipif(os.getuid() != 0, reason="acting as another user needs root")
def test_shm_says_nothing_to_other_users(one_worker):
    """A process of another user is disconnected before it gets even the challenge."""
    ref, _ = one_worker
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only socket calls, then _exit
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:
                other.settimeout(10)
                other.connect(local_socket.sockaddr(ref.local_socket))
                os.write(write, b"got:" + other.recv(1 << 16))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(write, f"error:{type(e).__name__}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as answer:
        assert answer.read() == b"got:"  # connected, then closed without a word


def _refused(kind: str, ref: WorkerRef, layer, rows, hidden, ids, counts, dtype="float32", nbytes=None) -> str:
    """The status a raw Forward request gets (it must be refused)."""
    if kind == "grpc":
        transport = GrpcTransport(ref.address, SECRET)
        with pytest.raises(grpc.RpcError) as e:
            transport.stub.Forward(_forward(layer, rows, hidden, ids, counts, dtype, nbytes), timeout=10,
                                   metadata=transport.metadata)
        return e.value.code().name
    nbytes = rows * hidden * 4 if nbytes is None else nbytes
    buffer, fd = shared_buffer(max(2 * nbytes, 1))
    header = ForwardHeader(layer, rows, hidden, dtype, nbytes, tuple(ids), tuple(counts))
    sock = local_socket.connect(ref.local_socket, SECRET, MODE_SHM, 10)
    try:
        with pytest.raises(CallFailed) as e:
            local_socket.call(sock, header.pack(), [fd], 10, "test")
    finally:
        os.close(fd)
        sock.close()
    return e.value.status


@pytest.mark.parametrize("name,kw", [
    ("counts do not cover the rows", dict(rows=64, ids=[0], counts=[0])),
    ("negative count", dict(rows=2, ids=[0, 1], counts=[3, -1])),
    ("lists of different lengths", dict(rows=2, ids=[0, 1], counts=[2])),
    ("bytes short of the shape", dict(rows=4, ids=[0], counts=[4], nbytes=8)),
    ("wrong hidden size", dict(rows=1, ids=[0], counts=[1], hidden=3)),
    ("unknown dtype", dict(rows=1, ids=[0], counts=[1], dtype="int8")),
    ("expert id out of range", dict(rows=1, ids=[99], counts=[1])),
    ("layer out of range", dict(rows=1, ids=[0], counts=[1], layer=50)),
])
def test_forward_requests_are_validated(one_worker, kind, name, kw):
    ref, cfg = one_worker
    status = _refused(kind, ref, kw.get("layer", 0), kw["rows"], kw.get("hidden", cfg.hidden_size), kw["ids"],
                      kw["counts"], kw.get("dtype", "float32"), kw.get("nbytes"))
    assert status == "INVALID_ARGUMENT", name
    _still_serves(ref, cfg, kind)


def test_shm_buffers_are_validated(one_worker, tmp_path):
    """What only shared memory can get wrong: the buffer (too small, not sealed against a shrink
    that would crash the worker, not a memfd, more than one) and the header's bytes."""
    ref, cfg = one_worker
    nbytes = 4 * cfg.hidden_size
    header = ForwardHeader(0, 1, cfg.hidden_size, "float32", nbytes, (0,), (1,)).pack()
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, 2 * nbytes)
    cases = {"too small": ([shared_buffer(2 * nbytes - 1)[1]], header),
             "not sealed": ([unsealed], header),
             "not a memfd": ([os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)], header),
             "two buffers": ([shared_buffer(2 * nbytes)[1], shared_buffer(2 * nbytes)[1]], header),
             "cut-off header": ([shared_buffer(2 * nbytes)[1]], header[:-3]),
             "no header": ([shared_buffer(2 * nbytes)[1]], b"G")}
    for name, (fds, message) in cases.items():
        sock = local_socket.connect(ref.local_socket, SECRET, MODE_SHM, 10)
        try:
            with pytest.raises(CallFailed, match="INVALID_ARGUMENT"):
                local_socket.call(sock, message, fds, 10, name)
        finally:
            sock.close()
            for fd in fds:
                os.close(fd)
    _still_serves(ref, cfg, "shm")


def test_experts_not_held_are_a_failed_precondition(checkpoint_factory, workers, kind):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    ref = worker_ref(workers(model, [[(0, 0)]])[0])
    assert _refused(kind, ref, 0, 1, cfg.hidden_size, [1], [1]) == "FAILED_PRECONDITION"


def test_all_rows_to_one_expert_and_idle_workers_get_no_call(checkpoint_factory, workers):
    """A batch whose tokens all chose one expert is served (by its copy alone); a worker that
    holds none of the experts with rows gets no call at all, so it cannot stall the step."""
    import torch

    from cluster.loader import load_experts
    from cluster.model.experts import LocalExperts

    model = str(checkpoint_factory("mixtral"))
    ckpt, family, cfg = open_model(model)
    placement = round_robin(cfg.experts(), 2)
    engine, remote, _ = _engine(model, placement, workers(model, placement.workers))
    local = LocalExperts(load_experts(ckpt, family, cfg, cfg.experts()))
    rows = torch.randn(64, cfg.hidden_size)
    counts = [64] + [0] * (cfg.num_experts - 1)  # every row chose expert 0 (held by worker 0 only)
    out = remote.run(0, rows, counts)
    assert torch.allclose(out, local.run(0, rows, counts), atol=1e-5)
    assert remote.stats.snapshot()["calls_per_worker"] == {"0": 1}
