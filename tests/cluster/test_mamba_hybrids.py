"""Mamba hybrids (Nemotron-H / Nemotron 3, Granite 4.0-H, Jamba): the Mamba-2 mixer's chunked scan against its
one-token recurrence, Mamba-1's scan resuming from its state, preemption and chunked prefill keeping outputs
under a tiny state + KV budget, what the planner sets aside per sequence, and what is refused. Parity with
transformers is test_published.py's (the published configs)."""
import json

import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.errors import UnsupportedModelError
from cluster.families import get_family, resolve
from cluster.model.mamba import chunked_selective_scan, scan_chunk, selective_scan
from cluster.model.mamba2 import chunked_scan, recurrent_step
from cluster.model.state_cache import state_bytes_per_seq
from cluster.sizing import format_sizing, sizing_from_config
from tests.cluster.helpers import preempted_and_chunked_equal_roomy
from tests.published_checkpoints import build
from tests.published_configs import PUBLISHED, tiny

NEMOTRON = "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
SUPER = "NVIDIA-Nemotron-3-Super-120B-A12B-BF16"
GRANITE = "granite-4.0-h-small"
JAMBA = "AI21-Jamba-1.5-Mini"
HYBRIDS = [NEMOTRON, GRANITE, JAMBA]


def _cfg(name: str, released: bool = False):
    family, text = resolve(PUBLISHED[name] if released else tiny(name))
    return family.parse_config(text)


def test_chunked_scan_equals_the_recurrence():
    """The chunked form (prefill) against the one-token recurrence (decode), 2 heads a group, over
    several chunks and across a split: the state a first piece leaves is where the second starts."""
    torch.manual_seed(0)
    n, h, p, g, s = 70, 4, 3, 2, 5
    x, b, c = torch.randn(n, h, p), torch.randn(n, g, s), torch.randn(n, g, s)
    dt, a, d = torch.rand(n, h) * 0.5, -torch.rand(h) - 0.1, torch.randn(h)
    state0 = torch.randn(h, p, s) * 0.1
    whole, s_whole = chunked_scan(x, dt, a, b, c, d, state0, chunk=16)
    state, outs = state0[None], []
    for t in range(n):
        o, state = recurrent_step(x[t:t + 1], dt[t:t + 1], a, b[t:t + 1], c[t:t + 1], d, state)
        outs.append(o[0])
    torch.testing.assert_close(whole, torch.stack(outs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_whole, state[0], atol=1e-4, rtol=1e-4)
    first, s_first = chunked_scan(x[:37], dt[:37], a, b[:37], c[:37], d, state0, chunk=16)
    second, s_second = chunked_scan(x[37:], dt[37:], a, b[37:], c[37:], d, s_first, chunk=16)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_second, s_whole, atol=1e-4, rtol=1e-4)


def test_mamba1_scan_resumes_from_its_state():
    """Mamba-1's scan over a prompt equals a first piece, then a batched one-token step per token (decode) from
    the state it left."""
    torch.manual_seed(0)
    n, i, s = 12, 6, 4
    x, dt, b, c = torch.randn(n, i), torch.rand(n, i), torch.randn(n, s), torch.randn(n, s)
    a, d, state0 = -torch.rand(i, s) - 0.1, torch.randn(i), torch.randn(i, s) * 0.1
    whole, s_whole = selective_scan(x, dt, a, b, c, d, state0)
    first, state = selective_scan(x[:5], dt[:5], a, b[:5], c[:5], d, state0)
    outs = [first]
    for t in range(5, n):  # as decode runs it: a batch of one sequence, one token
        o, batched = selective_scan(x[t][None, None], dt[t][None, None], a, b[t][None, None], c[t][None, None], d,
                                    state[None])
        outs.append(o[0])
        state = batched[0]
    torch.testing.assert_close(torch.cat(outs), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_whole, atol=1e-5, rtol=1e-5)


def test_mamba1_chunked_scan_equals_the_recurrence():
    """Mamba-1's chunked scan (prefill) against the token-by-token recurrence (decode) over several chunks and a
    short last one, with decays from slow to near-total (dt·A down to about −10 a step), and across a split: the
    state a first piece leaves is where the second starts."""
    torch.manual_seed(0)
    n, i, s = 70, 6, 4
    x, b, c = torch.randn(n, i), torch.randn(n, s), torch.randn(n, s)
    dt, a = torch.rand(n, i) * 2, -torch.linspace(0.05, 5, i * s).reshape(i, s)
    d, state0 = torch.randn(i), torch.randn(i, s) * 0.1
    want, s_want = selective_scan(x, dt, a, b, c, d, state0)
    whole, s_whole = chunked_selective_scan(x, dt, a, b, c, d, state0, chunk=16)
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_whole, s_want, atol=1e-5, rtol=1e-5)
    first, s_first = chunked_selective_scan(x[:37], dt[:37], a, b[:37], c[:37], d, state0, chunk=16)
    second, s_second = chunked_selective_scan(x[37:], dt[37:], a, b[37:], c[37:], d, s_first, chunk=16)
    torch.testing.assert_close(torch.cat([first, second]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_second, s_want, atol=1e-5, rtol=1e-5)


def test_mamba1_chunk_bounds_its_decay():
    """On CPU the chunk shrinks as channels × state grow (to stay in cache): 32 for the tiny configs (128 × 16),
    2 for Jamba-1.5 (8192 × 16), never below 2; on a GPU 128 (what the measurements chose)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU needed
    assert [scan_chunk(i, 16, cpu) for i in (64, 128, 8192)] == [64, 32, 2]
    assert scan_chunk(128, 16, gpu) == scan_chunk(8192, 16, gpu) == 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def make(name: str):
        if name not in made:
            made[name], _ = build(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return made[name]

    return make


@pytest.mark.parametrize("name", HYBRIDS)
def test_preemption_and_chunked_prefill_keep_outputs(checkpoint, name):
    """3 state slots and 8 blocks of 4 tokens for 4 requests of up to 26 tokens: sequences are preempted
    (their state freed) and recomputed, prompts prefilled 8 tokens a step beside running decodes; greedy
    and seeded outputs equal one roomy engine's whole-prompt ones, and every slot and block comes back. Each
    step runs as two micro-batches (the overlap's split carries the state slots past one-part blocks too)."""
    preempted_and_chunked_equal_roomy(str(checkpoint(name)))


@pytest.mark.parametrize("name", [NEMOTRON, SUPER, JAMBA])  # Mamba-2 (Super: with the latent MoE) and Mamba-1
def test_bf16_follows_fp32(checkpoint, name):
    """Served in bf16 (activations and conv state bf16, the SSM state fp32), the logits stay within bf16's
    rounding of the fp32 ones over a prompt crossing scan chunks."""
    from tests.helpers import our_greedy_logits

    prompt = [(7 * i + 3) % 250 + 1 for i in range(80)]
    fp32 = LLMEngine.from_pretrained(str(checkpoint(name)), dtype="float32", max_model_len=128)
    bf16 = LLMEngine.from_pretrained(str(checkpoint(name)), dtype="bfloat16", max_model_len=128)
    assert bf16.cache.states.conv.dtype == torch.bfloat16 and bf16.cache.states.recurrent.dtype == torch.float32
    _, want = our_greedy_logits(fp32, prompt, 1)
    _, got = our_greedy_logits(bf16, prompt, 1)
    assert (got[0].float() - want[0]).abs().max() < 0.05 < want[0].abs().max()


def test_nemotron_blocks_follow_the_pattern():
    cfg = _cfg(NEMOTRON)  # "MEMEM*E"
    assert cfg.linear_layer_ids == (0, 2, 4) and cfg.attention_layer_ids == (5,) and cfg.moe_layer_ids == (1, 3, 6)
    assert [cfg.has_mixer(i) for i in range(7)] == [True, False, True, False, True, True, False]
    assert not any(cfg.rotates(i) for i in range(7)) and not cfg.expert_activation.gated
    assert cfg.expert_params == 2 * 64 * 32  # up and down only


# (released config, total and active parameters in B, Mamba-2 layers, conv channels, state [H, P, N], KV bytes per
# token): Nemotron 3 Nano is "31.6B total, 3.5B active" (NVIDIA's card), Granite 4.0-H Small "32B-A9B" (IBM's), Jamba
# 1.5 Mini "52B total, 12B active" (AI21's). Jamba's Mamba-1 state is [I, N] per layer (no heads).
PLANS = [
    (NEMOTRON, (31.0, 32.0), (3.4, 3.7), 23, 4096 + 2 * 8 * 128, (64, 64, 128), 6 * 2 * 2 * 128 * 2),
    (GRANITE, (31.5, 32.5), (8.5, 9.2), 36, 8192 + 2 * 1 * 128, (128, 64, 128), 4 * 2 * 8 * 128 * 2),
    (JAMBA, (51.0, 52.5), (11.8, 12.4), 28, 8192, (8192, 16, 1), 4 * 2 * 8 * 128 * 2),
]


@pytest.mark.parametrize("name,total,active,layers,channels,state,kv", PLANS)
def test_plan_counts_the_mamba_state(tmp_path, name, total, active, layers, channels, state, kv):
    """As released: each sequence's state over the Mamba-2 layers (conv over x, B, C: 3 taps in bf16; SSM state in
    fp32) is set aside before KV blocks for the attention layers."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    p = sizing_from_config(str(tmp_path), workers=8, max_num_seqs=16, max_model_len=32768)
    assert total[0] * 1e9 < p.total_params < total[1] * 1e9 and active[0] * 1e9 < p.active_params < active[1] * 1e9
    assert p.state_bytes_per_seq == state_bytes_per_seq(_cfg(name, released=True), torch.bfloat16) \
        == layers * (channels * 3 * 2 + state[0] * state[1] * state[2] * 4)
    assert p.kv_bytes_per_token == kv
    assert "recurrent state" in format_sizing(p)


@pytest.mark.parametrize("name,changes,field", [
    (SUPER, {"moe_latent_size": 0}, "moe_latent_size"),
    (NEMOTRON, {"hybrid_override_pattern": "MEMEM*EX"}, "hybrid_override_pattern"),
    (NEMOTRON, {"num_hidden_layers": 8}, "num_hidden_layers"),
    (NEMOTRON, {"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
    (NEMOTRON, {"n_groups": 3}, "n_groups"),
    (NEMOTRON, {"mamba_proj_bias": True}, "mamba_proj_bias"),
    (GRANITE, {"layer_types": ["mamba", "mamba", "sliding_attention", "mamba"]}, "layer_types"),
    (GRANITE, {"mamba_d_head": 4}, "mamba_d_head"),
    (GRANITE, {"num_local_experts": 0}, "num_local_experts"),
    (JAMBA, {"attn_layer_offset": 8}, "attn_layer_offset"),
    (JAMBA, {"mamba_proj_bias": True}, "mamba_proj_bias"),
    (JAMBA, {"num_experts": 1}, "num_experts"),
])
def test_refusals_name_the_field(name, changes, field):
    cfg = {**tiny(name), **changes}
    with pytest.raises(UnsupportedModelError, match=field):
        get_family(cfg["model_type"]).parse_config(cfg)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_nemotron_routing_equals_transformers_router(n_group, topk_group):
    """Sigmoid scores, the correction bias steering the choice, group-limited top-k (the released config has no
    groups; a config with them is routed as transformers' NemotronHTopkRouter routes it), normalised, scaled."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    from cluster.model.gating import route

    raw = {**tiny(NEMOTRON), "n_group": n_group, "topk_group": topk_group}
    cfg = get_family("nemotron_h").parse_config(raw)
    hf_cfg = NemotronHConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "torch_dtype",
                                                                           "transformers_version")})
    torch.manual_seed(0)
    router = NemotronHTopkRouter(hf_cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(32, cfg.hidden_size)
    _, want_w, want_ids = router(x)
    got_w, got_ids = route(torch.nn.functional.linear(x, router.weight), cfg.gating, router.e_score_correction_bias)
    order_w, order_g = want_ids.sort(-1), got_ids.sort(-1)
    assert torch.equal(order_w.values, order_g.values)
    torch.testing.assert_close(got_w.gather(-1, order_g.indices), want_w.gather(-1, order_w.indices))


def test_nemotron_mlp_blocks_match_transformers(tmp_path):
    """A pattern with '-' blocks (a dense squared-ReLU MLP, as Nemotron-H 8B / 47B have; Nano has none) and
    grouped routing: greedy tokens and logits as transformers'."""
    from tests.cluster.helpers import PROMPT, TOLERANCE
    from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits

    overrides = {"hybrid_override_pattern": "M-*EM", "num_hidden_layers": 5, "n_group": 4, "topk_group": 2}
    ours, reference = build(NEMOTRON, tmp_path, overrides=overrides)
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_model_len=64)
    assert engine.cfg.mlp_layers == (False, True, False, True, False) and engine.cfg.moe_layer_ids == (3,)
    hf_tokens, hf_logits = hf_greedy_logits(load_hf(reference), PROMPT, 4)
    tokens, logits = our_greedy_logits(engine, PROMPT, 4)
    assert tokens == hf_tokens
    assert max((a - b).abs().max().item() for a, b in zip(logits, hf_logits)) < TOLERANCE


def test_super_plan_counts_latent_rows(tmp_path):
    """As released, the planner's figures equal the release's: 120,668,687,360 parameters and 12,770,216,960 active
    (its safetensors headers' 123,611,012,096 less the 2,942,324,736 of the MTP layer, and less the 107,898,470,400
    of the experts a token does not use, as a public parameter-count test quotes them), each expert up and down at
    the latent 1024, and a routed row of 1024 bf16 values (2 KiB, a quarter of a hidden-wide one) each way:
    22 rows out and back on each of the 40 MoE layers per token."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[SUPER]))
    p = sizing_from_config(str(tmp_path), workers=8, max_num_seqs=16, max_model_len=32768)
    cfg = _cfg(SUPER, released=True)
    assert (cfg.expert_row_size, cfg.hidden_size, len(cfg.moe_layer_ids), cfg.top_k) == (1024, 4096, 40, 22)
    assert (p.total_params, p.active_params) == (120_668_687_360, 12_770_216_960)
    assert p.expert_params == 2 * 1024 * 2688 and p.expert_bytes == 2 * 1024 * 2688 * 2
    assert p.row_bytes == cfg.row_bytes(torch.bfloat16) == 1024 * 2
    assert p.routed_bytes_per_token == 2 * 22 * 40 * 1024 * 2
    nano = sizing_from_config(str(_released(tmp_path / "nano", NEMOTRON)), workers=8)
    assert nano.row_bytes == 2688 * 2  # no latent: hidden-wide rows
    assert "routed rows: 2.00 KiB each way" in format_sizing(p)


def _released(root, name):
    root.mkdir()
    (root / "config.json").write_text(json.dumps(PUBLISHED[name]))
    return root


class _Recorder:
    """The real in-process experts, noting the width of every batch of rows they are sent."""

    def __init__(self, experts):
        self.experts, self.widths = experts, set()

    def begin_step(self) -> None:
        self.experts.begin_step()

    def submit(self, layer, rows, counts):
        self.widths.add(rows.shape[1])
        return self.experts.submit(layer, rows, counts)

    def run(self, layer, rows, counts):
        return self.submit(layer, rows, counts).result()


def test_super_sends_latent_rows_to_the_experts(checkpoint):
    """The router projects to the latent before dispatch: the experts see only latent-wide rows (16 of the 64
    hidden), their weights are that wide, and the projections stay with the router (the backbone)."""
    from cluster.model.experts import LocalExperts

    engine = LLMEngine.from_pretrained(str(checkpoint(SUPER)), dtype="float32", max_model_len=64)
    cfg, model = engine.cfg, engine.model
    assert isinstance(model.experts, LocalExperts) and cfg.expert_row_size == cfg.moe_latent_size == 16
    recorder = _Recorder(model.experts)
    model.experts = recorder
    engine.generate([[5, 17, 33, 2, 90]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert recorder.widths == {16}
    layer = model.weights.layers[cfg.moe_layer_ids[0]]
    assert layer.latent_in.shape == (16, 64) and layer.latent_out.shape == (64, 16)
