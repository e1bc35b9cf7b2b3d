"""The linear layers' host work per step: what a decode step of a hybrid model does not do any more
(per-layer host->device tensors, state masks when no state starts, gathers when every row decodes, syncs),
and that the leaner forms give the same numbers bit for bit."""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.engine import LLMEngine, SamplingParams
from cluster.model.batch import make_batch
from cluster.model.deltanet import _heads, recurrent_step, repeat_heads
from cluster.model.state_cache import StateCache
from tests.published_checkpoints import build

NAME = "Qwen3-Next-80B-A3B-Instruct"
SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default"}


class OpsByFile(TorchDispatchMode):
    """Counts aten ops by the cluster/ file that called them (its innermost frame there)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = [f for f in traceback.extract_stack() if "/cluster/" in f.filename and "/tests/" not in f.filename]
        if frames:
            self.ops[frames[-1].filename.rsplit("/", 1)[-1]][str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape,dim", [((3, 2, 5), -2), ((4, 2, 3), 1), ((2, 3, 2, 4), 2)])
def test_repeat_heads_is_repeat_interleave(shape, dim):
    t = torch.randn(shape)
    assert torch.equal(repeat_heads(t, 3, dim), t.repeat_interleave(3, dim=dim))


def test_recurrent_step_matches_the_time_axis_form_bit_for_bit():
    torch.manual_seed(0)
    b, hk, hv, dk, dv = 3, 2, 4, 8, 6
    q, k, v = torch.randn(b, hk, dk), torch.randn(b, hk, dk), torch.randn(b, hv, dv)
    g, beta, state = -torch.rand(b, hv), torch.rand(b, hv), torch.randn(b, hv, dk, dv)
    # the form before: through _heads with a time axis of one token
    qh, kh, vh, bh, gh = _heads(q[:, None], k[:, None], v[:, None], beta[:, None], g[:, None])
    qh, kh, vh, bh, gh = qh[:, :, 0], kh[:, :, 0], vh[:, :, 0], bh[:, :, 0], gh[:, :, 0]
    s = state * gh.exp()[..., None, None]
    s = s + kh[..., None] * ((vh - (s * kh[..., None]).sum(dim=-2)) * bh[..., None])[..., None, :]
    out, new = recurrent_step(q, k, v, g, beta, state)
    assert torch.equal(out, (s * qh[..., None]).sum(dim=-2)) and torch.equal(new, s)


def test_state_groups_are_built_once_a_step():
    items = [([0], [5], 3), ([1], [6, 7, 8], 0), ([2], [9], 0), ([3], [1, 2], 4)]  # decode, prompt, first token, chunk
    batch = make_batch(items, block_size=8, state_slots=[4, 2, 0, 1])
    p = batch.prefill
    assert p is batch.prefill  # cached: every linear layer of the step reads the same tensors
    assert p.rows.tolist() == [1, 2, 3, 5, 6] and p.state_slots.tolist() == [2, 1]
    assert p.fresh.tolist() == [True, False] and p.cu_seqlens.tolist() == [0, 3, 5]
    assert p.cu_seqlens_cpu.device.type == "cpu" and p.cu_seqlens_cpu.tolist() == [0, 3, 5]
    assert batch.decode_fresh.tolist() == [False, True] and not batch.decode_only
    decoding = make_batch([([0], [5], 3), ([1], [6], 9)], block_size=8)
    assert decoding.decode_only and decoding.decode_fresh is None and decoding.prefill is None


def test_state_read_without_fresh_is_the_read_with_none_fresh():
    cache = StateCache((0, 2), num_slots=4, conv_shape=(3, 2), recurrent_shape=(2, 3, 3))
    cache.write(2, torch.tensor([1, 3]), torch.randn(2, 3, 2), torch.randn(2, 2, 3, 3))
    slots = torch.tensor([3, 1])
    plain, masked = cache.read(2, slots, None), cache.read(2, slots, torch.tensor([False, False]))
    assert all(torch.equal(a, b) for a, b in zip(plain, masked))
    conv, recurrent = cache.read(2, slots, torch.tensor([True, False]))
    assert not conv[0].any() and not recurrent[0].any() and torch.equal(recurrent[1], plain[1][1])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ours, _ = build(NAME, tmp_path_factory.mktemp("qwen3_next"))
    return LLMEngine.from_pretrained(str(ours), max_num_seqs=4, max_model_len=128)


def test_decode_step_of_linear_layers_has_no_gather_mask_host_tensor_or_sync(engine):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for prompt in ([1, 2, 3, 4, 5], [6, 7, 8]):
        engine.add_request(prompt, params)
    engine.step()  # the prompts
    with OpsByFile() as seen:
        engine.step()  # every row a decode, no state starting: nothing to gather, scatter or mask
    layer, states = seen.ops["deltanet.py"], seen.ops["state_cache.py"]
    banned = {"aten.where.ScalarOther", "aten.eq.Scalar", "aten.bitwise_not.default", "aten.lift_fresh.default",
              "aten._to_copy.default", *SYNCS}
    assert layer and not (banned | {"aten.index.Tensor", "aten.index_put_.default"}) & set(layer), layer
    assert not banned & set(states), states
    # the state cache's reads and writes (conv, recurrent) are all that index: 3 linear layers
    assert states["aten.index.Tensor"] == states["aten.index_put_.default"] == 2 * 3
    while engine.has_unfinished():
        engine.step()


def test_prefill_step_moves_its_state_indices_once(engine):
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for prompt in ([1, 2, 3, 4, 5], [6, 7, 8], [9]):
        engine.add_request(prompt, params)
    with OpsByFile() as seen:
        engine.step()
    linear = seen.ops["deltanet.py"] + seen.ops["state_cache.py"]
    assert linear and not {"aten.lift_fresh.default", "aten._to_copy.default", *SYNCS} & set(linear)
    while engine.has_unfinished():
        engine.step()



def test_micro_batches_build_their_own_state_groups(tmp_path):
    """With overlap each micro-batch is a Batch of its own (rows renumbered): its prefill group, fresh mask and
    decode-only flag come from its own chunks, and the tokens are those of the whole batch."""
    ours, _ = build(NAME, tmp_path)
    runs = []
    for overlap in (False, True):
        engine = LLMEngine.from_pretrained(str(ours), max_num_seqs=4, max_model_len=128, overlap=overlap)
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        tokens = collections.defaultdict(list)
        for p in ([1, 2, 3, 4, 5], [9]):
            engine.add_request(p, params)
        for o in engine.step():
            tokens[o.request_id].append(o.token_id)
        for p in ([6, 7, 8], [4]):  # prompts (one a single token) beside decodes
            engine.add_request(p, params)
        while engine.has_unfinished():
            for o in engine.step():
                tokens[o.request_id].append(o.token_id)
        runs.append(dict(tokens))
    assert runs[0] == runs[1] and all(len(t) == 6 for t in runs[0].values()) and len(runs[0]) == 4
