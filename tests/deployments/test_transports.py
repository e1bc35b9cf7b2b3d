"""The transports themselves: which one a worker gets, the control channel's wire and mutual
authentication, gRPC's chunked streams, shared-memory buffers that grow, CUDA IPC (on a GPU;
skipped without CUDA), and an 8192-token prefill at Qwen3-30B-A3B layer sizes through one
worker on each CPU transport."""
import json
import logging
import socket
import threading
import time

import grpc
import pytest
import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from cluster.placement import Placement, Table, WorkerRef
from deployments.experts import transport as transports
from deployments.experts.compute import ExpertCompute
from deployments.experts.host import ExpertHost, WorkerSpec
from deployments.experts.remote import RemoteExperts, on_side_stream
from deployments.experts.stats import error_code
from deployments.experts.transport import grpc as grpc_transport
from deployments.experts.transport import local_socket
from deployments.experts.transport import cuda_ipc, local_server
from deployments.experts.transport.cuda_ipc import CudaIpcTransport
from deployments.experts.transport.local_socket import (GREETING, MODE_CUDA_IPC, MODE_SHM, CallFailed,
                                                        ForwardHeader, reply)
from deployments.experts.transport.shm import ShmSession, ShmTransport
from deployments.experts.validate import REFUSALS, BadRequest, NoRoom, NotHeld, refusal
from protos import expert_pb2
from tools.checkpoints import make_checkpoint
from tests.deployments.helpers import HERE, SECRET, start_worker, worker_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ref(**kw) -> WorkerRef:
    return WorkerRef(**{"address": "127.0.0.1:1", "node_id": HERE, "local_socket": "/x/s", "device": "cpu", **kw})


@pytest.mark.parametrize("ref,device,prefer,cuda_available,expected", [
    (_ref(), "cpu", "auto", False, "shm"),
    (_ref(device="cuda"), "cuda", "auto", True, "cuda_ipc"),
    (_ref(device="cuda"), "cuda", "auto", False, "shm"),  # never CUDA IPC without CUDA
    (_ref(device="cuda"), "cuda", "cuda_ipc", False, "shm"),
    (_ref(device="cpu"), "cuda", "cuda_ipc", True, "shm"),  # a CPU worker: shared memory
    (_ref(device="cuda"), "cuda", "shm", True, "shm"),
    (_ref(device="cuda"), "cuda", "grpc", True, "grpc"),
    (_ref(node_id="elsewhere"), "cpu", "shm", True, "grpc"),  # another node: gRPC whatever is asked
    (_ref(local_socket=""), "cpu", "auto", True, "grpc"),  # a worker without a local endpoint
])
def test_the_transport_follows_locality(ref, device, prefer, cuda_available, expected):
    assert transports.choose(ref, node_id=HERE, device=device, prefer=prefer,
                             cuda_available=lambda: cuda_available) == expected


def test_unknown_nodes_and_preferences():
    assert transports.choose(_ref(node_id=""), node_id="", device="cpu") == "grpc"  # "" is no node
    with pytest.raises(ValueError, match="data_plane_transport"):
        transports.choose(_ref(), node_id=HERE, device="cpu", prefer="nccl")


def test_forward_headers_round_trip_and_malformed_ones_are_refused():
    h = ForwardHeader(3, 7, 64, "bfloat16", 7 * 64 * 2, (1, 5), (3, 4))
    assert ForwardHeader.unpack(h.pack()) == h
    for bad in (b"", b"F", h.pack()[:-1], h.pack() + b"\0", b"G" + h.pack()[1:]):
        with pytest.raises(BadRequest):
            ForwardHeader.unpack(bad)
    assert ForwardHeader.unpack(ForwardHeader(0, 1, 64, "int8", 4, (0,), (1,)).pack()).dtype == "dtype code 255"


def test_error_codes_are_uniform_across_transports():
    class Rpc(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

    assert {error_code(e) for e in (Rpc(), TimeoutError(), socket.timeout())} == {"DEADLINE_EXCEEDED"}
    assert error_code(CallFailed("INVALID_ARGUMENT", "x")) == "INVALID_ARGUMENT"
    assert error_code(ConnectionRefusedError()) == "ConnectionRefusedError"


@pytest.mark.parametrize("error,status,message", [
    (BadRequest("counts [3] must be ≥ 0 and sum to the 2 rows"), "INVALID_ARGUMENT",
     "w0: counts [3] must be ≥ 0 and sum to the 2 rows"),
    (NotHeld("holds no copy of layer 0 expert(s) [1]"), "FAILED_PRECONDITION",
     "w0: holds no copy of layer 0 expert(s) [1]"),
    (NoRoom("OutOfMemoryError"), "RESOURCE_EXHAUSTED", "w0: OutOfMemoryError"),
    (KeyError("a secret detail"), "INTERNAL", "w0: KeyError"),  # no refusal: only its type is told
])
def test_every_refusal_has_one_status_and_one_message_on_every_transport(error, status, message):
    assert refusal("w0", error) == (status, message)
    assert grpc.StatusCode[status].name == status
    with pytest.raises(CallFailed) as e:
        local_socket.parse_reply(reply(status, message.encode()), "w0")
    assert (e.value.status, e.value.message) == (status, message)


def test_the_refusal_table_names_each_refusal_once():
    assert set(REFUSALS) == {BadRequest, NotHeld, NoRoom} and len(set(REFUSALS.values())) == len(REFUSALS)


def test_a_router_sends_nothing_to_a_worker_that_cannot_prove_the_secret(tmp_path):
    """Mutual authentication: an impostor bound at a worker's socket path learns no rows."""
    path = str(tmp_path / "impostor.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    received = []

    def impostor():
        conn, _ = listener.accept()
        conn.send(GREETING + bytes(32))
        conn.recv(1 << 16)
        conn.send(reply("OK", bytes(32)))  # a proof it cannot compute
        received.append(conn.recv(1 << 16))  # b"" once the router hangs up

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    with pytest.raises(CallFailed, match="UNAUTHENTICATED"):
        ShmTransport("impostor", path, SECRET).forward(0, torch.ones(1, 4), [0], [1], 10)
    thread.join(10)
    listener.close()
    assert received == [b""]


@pytest.fixture(scope="module")
def in_process_worker(tmp_path_factory):
    """A worker (gRPC + Unix socket) in this process, and the same experts in-process."""
    model = str(make_checkpoint("mixtral", tmp_path_factory.mktemp("transports")))
    ckpt, family, cfg = open_model(model)
    local = LocalExperts(load_experts(ckpt, family, cfg, cfg.experts()))
    host = ExpertHost(WorkerSpec(model=model, secret=SECRET, experts=tuple(cfg.experts()), name="in-process",
                                 torch_threads=torch.get_num_threads()),
                      node_id=HERE)
    yield host.ref(), local, cfg
    host.stop()


def test_grpc_streams_calls_larger_than_a_chunk(in_process_worker, monkeypatch):
    ref, local, cfg = in_process_worker
    monkeypatch.setattr(grpc_transport, "CHUNK_BYTES", 1000)  # 64 rows of 64 floats: 17 chunks each way
    transport = grpc_transport.GrpcTransport(ref.address, SECRET)
    streams = []
    stream = transport.stub.ForwardStream
    transport.stub.ForwardStream = lambda *a, **kw: streams.append(1) or stream(*a, **kw)
    x = torch.randn(64, cfg.hidden_size)
    assert torch.equal(transport.forward(0, x, [0, 1], [40, 24], 10), local.run_subset(0, x, [0, 1], [40, 24]))
    assert streams == [1]
    assert torch.equal(transport.forward(0, x[:2], [0], [2], 10), local.run_subset(0, x[:2], [0], [2]))
    assert streams == [1]  # one chunk or less: a unary call


@pytest.mark.parametrize("name,parts", [
    ("no header first", lambda h, data: [expert_pb2.ForwardChunk(data=data)]),
    ("a second header", lambda h, data: [h, h, expert_pb2.ForwardChunk(data=data)]),
    ("bytes short of the shape", lambda h, data: [h, expert_pb2.ForwardChunk(data=data[:-4])]),
    ("bytes beyond the shape", lambda h, data: [h, expert_pb2.ForwardChunk(data=data),
                                                expert_pb2.ForwardChunk(data=b"\0" * 4)]),
])
def test_grpc_streams_are_validated(in_process_worker, name, parts):
    ref, _, cfg = in_process_worker
    transport = grpc_transport.GrpcTransport(ref.address, SECRET)
    x = torch.randn(3, cfg.hidden_size)
    header = expert_pb2.ForwardChunk(header=expert_pb2.ForwardRequest(
        layer=0, expert_id=[0], count=[3], hidden=expert_pb2.Tensor(shape=[3, cfg.hidden_size], dtype="float32")))
    with pytest.raises(grpc.RpcError) as e:
        list(transport.stub.ForwardStream(iter(parts(header, x.numpy().tobytes())), timeout=10,
                                          metadata=transport.metadata))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name


def test_shm_buffers_grow_with_the_batch(in_process_worker):
    ref, local, cfg = in_process_worker
    transport = transports.connect(ref, node_id=HERE, device="cpu", secret=SECRET)
    assert isinstance(transport, ShmTransport)
    sizes = []
    for rows in (1, 64, 5000, 70000, 3):  # 70000 rows of 64 floats need 36 MB: past the first buffers
        x = torch.randn(rows, cfg.hidden_size)
        counts = [rows // 3, rows - rows // 3]
        assert torch.equal(transport.forward(0, x, [2, 5], counts, 30), local.run_subset(0, x, [2, 5], counts))
        sizes.append(transport._idle[0].buffer.numel())
    assert sizes[0] == sizes[1] < sizes[3] == sizes[4] and sizes[3] >= 2 * 70000 * cfg.hidden_size * 4
    transport.close()


def test_cuda_ipc_is_refused_by_a_worker_on_a_cpu(in_process_worker):
    ref, _, _ = in_process_worker
    sock = local_socket.connect(ref.local_socket, SECRET, MODE_CUDA_IPC, 10)
    with sock, pytest.raises(CallFailed, match="INVALID_ARGUMENT.*needs a worker on a GPU"):
        local_socket.call(sock, b"G" + (1 << 20).to_bytes(8, "little"), [], 10, "cpu worker")


class UnmappableCudaIpcSession:
    """A GPU worker's CUDA IPC session whose buffers this process cannot map: the handles of a GPU
    without peer access to the router's (here: any handle, as this machine has no CUDA)."""

    def __init__(self, grows: list):
        self.grows = grows

    def handle(self, message: bytes, fds: list[int]) -> bytes:
        assert message[:1] == local_socket.OP_GROW, "no forward before the buffers are mapped"
        self.grows.append(message)
        fields = {"handle": "00" * 64, "size": 1 << 20, "offset": 0, "counter": "00" * 8, "counter_offset": 0,
                  "event": "", "sync": False}
        return json.dumps({"inputs": fields, "outputs": fields}).encode()

    def close(self) -> None:
        pass


def test_cuda_ipc_falls_back_to_shm_when_the_buffers_cannot_be_mapped(in_process_worker, caplog):
    """A failed mapping (no peer access) is a transport error, not a crash: that worker is reached by
    shared memory from then on, and the call that found out still gets its rows."""
    _, local, cfg = in_process_worker
    compute = ExpertCompute("gpu-without-peer-access", cfg, local, "cpu")
    grows: list = []
    unix = local_server.LocalServer("w", SECRET, {MODE_SHM: lambda: ShmSession(compute),
                                                  MODE_CUDA_IPC: lambda: UnmappableCudaIpcSession(grows)})
    try:
        ref = WorkerRef("127.0.0.1:1", HERE, local_socket=unix.path, device="cuda")
        channel = cuda_ipc.CudaIpcChannel(unix.path, SECRET, 10, torch.device("cuda", 0))
        with pytest.raises(cuda_ipc.MappingFailed, match="FAILED_PRECONDITION.*cannot be mapped") as e:
            channel._fit(1000, 10)
        assert isinstance(e.value, CallFailed)  # what failover counts: never a bare RuntimeError
        channel.close()
        transport = transports.CudaIpcOrShm(ref, SECRET, "cuda:0")
        x = torch.randn(9, cfg.hidden_size)
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            for _ in range(3):
                assert torch.equal(transport.forward(0, x, [2, 5], [4, 5], 10), local.run_subset(0, x, [2, 5], [4, 5]))
        assert transport.kind == "shm" and len(grows) == 2  # tried once (and by the channel above), then remembered
        assert [r.message for r in caplog.records if "CUDA IPC cannot map" in r.message]
        transport.close()
    finally:
        unix.close()


@cuda
def test_cuda_ipc_matches_local_experts_on_the_gpu(checkpoint_factory):
    """Rows cross device to device in bf16; buffers grow; a wrong secret is refused."""
    model = str(checkpoint_factory("mixtral"))
    ckpt, family, cfg = open_model(model)
    local = LocalExperts(load_experts(ckpt, family, cfg, cfg.experts(), dtype=torch.bfloat16, device="cuda"))
    proc = start_worker(model, cfg.experts(), "--device", "cuda", "--dtype", "bfloat16")
    try:
        ref = worker_ref(proc)
        transport = transports.connect(ref, node_id=HERE, device="cuda", secret=SECRET)
        assert isinstance(transport, transports.CudaIpcOrShm)
        for rows in (1, 64, 4096, 70000):
            x = torch.randn(rows, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
            counts = [rows // 2, rows - rows // 2]
            ready = torch.cuda.Event()
            ready.record()
            out = on_side_stream(ready, transport.forward, 0, x, [1, 6], counts, 30)  # as RemoteExperts calls it
            assert out.device.type == "cuda" and out.dtype == torch.bfloat16
            torch.testing.assert_close(out, local.run_subset(0, x, [1, 6], counts))
        assert transport.kind == "cuda_ipc"
        with pytest.raises(CallFailed, match="UNAUTHENTICATED"):
            CudaIpcTransport(ref.address, ref.local_socket, "wrong", "cuda").forward(0, x[:1], [1], [1], 10)
        transport.close()
    finally:
        proc.kill()
        proc.wait()


QWEN3_30B_LAYER = dict(hidden_size=2048, moe_intermediate_size=768, num_experts_per_tok=8)


@pytest.fixture(scope="module")
def prefill(tmp_path_factory):
    """One MoE layer at Qwen3-30B-A3B's sizes (hidden 2048, expert intermediate 768, top-8; 16 experts
    instead of 128, one layer) and the rows of an 8192-token prefill: 65536, sorted by expert."""
    model = str(make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3-30b-layer"), num_hidden_layers=1,
                                num_experts=16, intermediate_size=768, **QWEN3_30B_LAYER))
    ckpt, family, cfg = open_model(model)
    torch.manual_seed(0)
    ids = torch.rand(8192, cfg.num_experts).topk(cfg.top_k, dim=-1).indices.flatten()  # [T*K]
    order = ids.argsort(stable=True)
    rows = torch.randn(8192, cfg.hidden_size).repeat_interleave(cfg.top_k, dim=0)[order]  # [T*K, D]
    counts = torch.bincount(ids, minlength=cfg.num_experts).tolist()
    local = LocalExperts(load_experts(ckpt, family, cfg, cfg.experts()))
    return model, cfg, rows, counts, local.run(0, rows, counts)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpc", "shm"])
def test_an_8192_token_prefill_at_qwen3_30b_sizes_through_one_worker(prefill, kind):
    model, cfg, rows, counts, expected = prefill
    assert rows.shape == (65536, 2048) and rows.nbytes == 512 << 20  # twice what one gRPC message could take
    proc = start_worker(model, cfg.experts())
    try:
        ref = worker_ref(proc)
        connect = lambda r: transports.connect(r, node_id=HERE, device="cpu", secret=SECRET, prefer=kind)  # noqa: E731
        remote = RemoteExperts(Table(1, Placement((tuple(cfg.experts()),)), (ref,)), connect, call_timeout_s=300)
        t0 = time.perf_counter()
        out = remote.run(0, rows, counts)
        print(f"\n8192-token prefill, 65536 rows at hidden 2048, one worker over {kind}: "
              f"{time.perf_counter() - t0:.1f} s")
        assert remote.stats.failovers == 0 and torch.equal(out, expected)
        remote.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_gpu_workers_busy_time_is_its_kernels_not_their_launch(in_process_worker, monkeypatch):
    """On a GPU run_subset returns once the kernels are queued: the worker waits for its stream before
    it reads the clock, so the busy fraction the pool autoscaler reads sees the GPU's work."""
    _, local, cfg = in_process_worker
    waited = []

    class Stream:  # the GPU still working for 50 ms after the launch returned
        def synchronize(self):
            waited.append(1)
            time.sleep(0.05)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: self if a == ("cuda",) else to(self, *a, **kw))
    compute = ExpertCompute("gpu-worker", cfg, local, "cuda")
    x = torch.randn(3, cfg.hidden_size)
    compute.run(0, x, [1], [3])
    assert waited == [1] and compute.busy_s >= 0.05
    cpu = ExpertCompute("cpu-worker", cfg, local, "cpu")
    cpu.run(0, x, [1], [3])
    assert waited == [1]  # a CPU worker's compute is done when it returns


@cuda
def test_expert_calls_run_on_the_pool_threads_own_stream():
    """Not the engine's default stream, where the other micro-batch's attention is queued (overlap)."""
    x = torch.randn(4, 8, device="cuda")
    ready = torch.cuda.Event()
    ready.record()
    seen = on_side_stream(ready, lambda t: (torch.cuda.current_stream(), t * 2), x)
    assert seen[0] != torch.cuda.default_stream() and torch.equal(seen[1], x * 2)
    assert on_side_stream(None, lambda t: torch.cuda.current_stream(), x) == torch.cuda.current_stream()


def test_expert_calls_without_cuda_rows_run_as_they_are():
    assert on_side_stream(None, lambda a, b: a + b, 2, 3) == 5


@pytest.fixture(scope="module")
def latent_worker(tmp_path_factory):
    """A worker in this process serving the tiny Nemotron 3 Super (experts at a latent 16 of the 64 hidden)."""
    from tests.published_checkpoints import build

    model, _ = build("NVIDIA-Nemotron-3-Super-120B-A12B-BF16", tmp_path_factory.mktemp("super"))
    ckpt, family, cfg = open_model(str(model))
    local = LocalExperts(load_experts(ckpt, family, cfg, cfg.experts()))
    host = ExpertHost(WorkerSpec(model=str(model), secret=SECRET, experts=tuple(cfg.experts()), name="latent",
                                 torch_threads=torch.get_num_threads()),
                      node_id=HERE)
    yield str(model), host.ref(), local, cfg
    host.stop()


@pytest.mark.parametrize("kind", ["grpc", "shm"])
def test_latent_rows_travel_and_hidden_wide_ones_are_refused(latent_worker, kind):
    """Nemotron 3 Super's rows are expert_row_size (the latent) wide on every transport: they come back as the
    in-process experts compute them, and rows of the hidden size are refused by name (INVALID_ARGUMENT)."""
    _, ref, local, cfg = latent_worker
    layer = cfg.moe_layer_ids[0]
    assert cfg.expert_row_size == cfg.moe_latent_size == 16 < cfg.hidden_size
    transport = transports.connect(ref, node_id=HERE, device="cpu", secret=SECRET, prefer=kind)
    x = torch.randn(9, cfg.expert_row_size)
    assert torch.equal(transport.forward(layer, x, [3, 40], [4, 5], 10), local.run_subset(layer, x, [3, 40], [4, 5]))
    with pytest.raises((CallFailed, grpc.RpcError)) as e:
        transport.forward(layer, torch.randn(9, cfg.hidden_size), [3, 40], [4, 5], 10)
    assert error_code(e.value) == "INVALID_ARGUMENT" and "[rows, 16]" in str(e.value)
    transport.close()


def test_latent_model_served_through_a_worker_equals_in_process(latent_worker):
    """The router projects to the latent and back, the worker computes latent-wide experts over shared memory:
    greedy tokens and logits as the engine with the experts in-process."""
    from cluster.engine import LLMEngine
    from tests.helpers import our_greedy_logits

    model, ref, _, cfg = latent_worker
    connect = lambda r: transports.connect(r, node_id=HERE, device="cpu", secret=SECRET, prefer="shm")  # noqa: E731
    remote = RemoteExperts(Table(1, Placement((tuple(cfg.experts()),)), (ref,)), connect, call_timeout_s=30)
    prompt = [(7 * i + 3) % 250 + 1 for i in range(40)]
    local = LLMEngine.from_pretrained(model, dtype="float32", max_model_len=64)
    split = LLMEngine.from_pretrained(model, dtype="float32", experts=remote, max_model_len=64)
    want_tokens, want = our_greedy_logits(local, prompt, 4)
    got_tokens, got = our_greedy_logits(split, prompt, 4)
    assert got_tokens == want_tokens and remote.stats.failovers == 0
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-5
    remote.close()


@cuda
def test_latent_rows_cross_by_cuda_ipc(latent_worker):
    """On GPUs the latent-wide rows go device to device (bf16) and come back as the in-process experts compute
    them; hidden-wide rows are refused."""
    model, _, _, cfg = latent_worker
    ckpt, family, _ = open_model(model)
    local = LocalExperts(load_experts(ckpt, family, cfg, cfg.experts(), dtype=torch.bfloat16, device="cuda"))
    proc = start_worker(model, cfg.experts(), "--device", "cuda", "--dtype", "bfloat16")
    try:
        transport = transports.connect(worker_ref(proc), node_id=HERE, device="cuda", secret=SECRET)
        layer = cfg.moe_layer_ids[0]
        x = torch.randn(300, cfg.expert_row_size, dtype=torch.bfloat16, device="cuda")
        ready = torch.cuda.Event()
        ready.record()
        out = on_side_stream(ready, transport.forward, layer, x, [2, 9], [100, 200], 30)
        torch.testing.assert_close(out, local.run_subset(layer, x, [2, 9], [100, 200]))
        assert transport.kind == "cuda_ipc"
        with pytest.raises(CallFailed, match=r"\[rows, 16\]"):
            transport.forward(layer, torch.randn(3, cfg.hidden_size, dtype=torch.bfloat16, device="cuda"),
                              [2], [3], 10)
        transport.close()
    finally:
        proc.kill()
        proc.wait()
