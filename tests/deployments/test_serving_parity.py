"""Greedy output through the distributed server (HTTP and gRPC) equals the in-process engine's."""
import pytest

from cluster.engine import LLMEngine, SamplingParams
from tests.deployments.clients import concurrently, grpc_request, grpc_stub, http_complete, http_stream
from tests.helpers import DEMO

pytestmark = pytest.mark.slow

TEXT_PROMPTS = ["def main(", "The license", "import os\nimport sys\n", "class Parser:\n    def __init__(self"]
ID_PROMPTS = [[5, 17, 33], [100], list(range(3, 40, 2)), [7, 7, 7, 7, 8]]
MAX_TOKENS = [12, 20, 8, 16]
# Long enough to cross a recurrent layer's prefill chunks (4 scan chunks of 32 and a partial one for the tiny
# Mamba hybrids on CPU, 2 of DeltaNet's 64 and a partial one), then decode from the state the scan leaves.
LONG_PROMPT, LONG_MAX_TOKENS = [(7 * i + 3) % 250 + 1 for i in range(150)], 10
RECURRENT = ("Qwen3-Next-80B-A3B-Instruct", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "granite-4.0-h-small",
             "AI21-Jamba-1.5-Mini")


def expected_tokens(model: str, prompts) -> list[list[int]]:
    engine = LLMEngine.from_pretrained(model, max_model_len=512)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in MAX_TOKENS])
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def models(checkpoint_factory):
    made = {}

    def get(name: str):
        if name not in made:
            path = str(DEMO) if name == "demo" else str(checkpoint_factory(name))
            prompts = TEXT_PROMPTS if name == "demo" else ID_PROMPTS
            made[name] = path, prompts, expected_tokens(path, prompts)
        return made[name]

    return get


# Each case is a deployment (the costly part of this file): every model and every worker count once,
# not their product. demo on 2 workers first: the same deployment as test_serving_api's, kept.
@pytest.mark.parametrize("name,num_workers", [("demo", 2), ("mixtral", 1), ("qwen2_moe", 4)])
def test_http_and_grpc_match_in_process(cluster, models, name, num_workers):
    path, prompts, expected = models(name)
    cluster.deploy(path, num_workers)
    got = concurrently(lambda i: http_complete(cluster.base, prompts[i], MAX_TOKENS[i])["choices"][0]["token_ids"],
                       range(len(prompts)))
    assert got == expected
    stub = grpc_stub(cluster.grpc_target)
    got = concurrently(lambda i: list(stub.Complete(grpc_request(prompts[i], MAX_TOKENS[i]), timeout=120).token_ids),
                       range(len(prompts)))
    assert got == expected
    streamed = [m.token_id for m in stub.Generate(grpc_request(prompts[2], MAX_TOKENS[2]), timeout=120)]
    assert streamed == expected[2]
    chunks = http_stream(cluster.base, prompts[1], MAX_TOKENS[1])
    assert [c["choices"][0]["token_ids"][0] for c in chunks] == expected[1]


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_through_two_workers(cluster, checkpoint_factory, family):
    """Shared experts run in the router, routed experts on the workers: output unchanged."""
    path = str(checkpoint_factory(family))
    expected = expected_tokens(path, ID_PROMPTS)
    cluster.deploy(path, 2)
    got = concurrently(lambda i: http_complete(cluster.base, ID_PROMPTS[i], MAX_TOKENS[i])["choices"][0]["token_ids"],
                       range(len(ID_PROMPTS)))
    assert got == expected
    stub = grpc_stub(cluster.grpc_target)
    got = concurrently(lambda i: list(stub.Complete(grpc_request(ID_PROMPTS[i], MAX_TOKENS[i]), timeout=120).token_ids),
                       range(len(ID_PROMPTS)))
    assert got == expected


def test_stream_interval_leaves_the_output_unchanged(cluster):
    """stream_interval 4: a router sends a stream's tokens four at a time (the first at once); every
    API still gives every token, in order (the grouping itself: test_serving_unit.py)."""
    path, prompts = str(DEMO), TEXT_PROMPTS
    expected = expected_tokens(path, prompts)
    cluster.deploy(path, 2, stream_interval=4)
    chunks = http_stream(cluster.base, prompts[1], MAX_TOKENS[1])
    assert [c["choices"][0]["token_ids"][0] for c in chunks] == expected[1]
    stub = grpc_stub(cluster.grpc_target)
    assert [m.token_id for m in stub.Generate(grpc_request(prompts[0], MAX_TOKENS[0]), timeout=120)] == expected[0]
    got = concurrently(lambda i: http_complete(cluster.base, prompts[i], MAX_TOKENS[i])["choices"][0]["token_ids"],
                       range(len(prompts)))
    assert got == expected


def _published_checkpoint(name: str, root) -> str:
    """Our checkpoint directory for a published config, stored as released."""
    if name == "DeepSeek-V4-Flash":
        from tests.deepseek_v4_checkpoints import build as build_v4

        return str(build_v4(root))
    from tests.published_checkpoints import build

    return str(build(name, root)[0])


@pytest.mark.parametrize("name", ["Llama-4-Maverick-17B-128E-Instruct", "Qwen3-Next-80B-A3B-Instruct",
                                  "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "granite-4.0-h-small",
                                  "AI21-Jamba-1.5-Mini", "gemma-4-26B-A4B-it", "DeepSeek-V4-Flash"])
def test_published_family_through_two_workers(cluster, tmp_path_factory, name):
    """The MoE paths furthest from the others, served with 2 workers: HTTP gives the in-process tokens, each
    with its logprob within 1e-4.
    Llama 4 (issue 18): the routing weight scales the expert's input, a shared expert, dense layers between
    MoE layers, fused experts, a multimodal wrapper checkpoint. Qwen3-Next (issue 19): the router holds the
    attention KV cache and every sequence's recurrent state, the two workers only experts. Nemotron 3 Nano
    (issue 19), the most served Mamba-2 hybrid: the router holds every sequence's Mamba-2 SSM and conv state
    beside the few attention layers' KV cache and the shared expert, the workers only the routed experts
    (relu2, no gate). Granite 4.0-H (issue 19): Mamba-2 under Granite's multipliers, a fused shared MLP in the
    router on every layer. Jamba (issue 19): Mamba-1's selective scan state in the router, dense MLPs between
    the MoE layers. The recurrent ones also serve a prompt that crosses their scan's chunks. Gemma 4: the dense
    MLP beside the experts stays in the router, per-layer KV shapes, a multimodal wrapper checkpoint.
    DeepSeek-V4 (issue 19): hash-routed layers (the router reads tid2eid, the workers never do),
    hyper-connections, the release's own tensor names."""
    ours = _published_checkpoint(name, tmp_path_factory.mktemp(name.replace(".", "_")))
    prompts, max_tokens = ID_PROMPTS, MAX_TOKENS
    if name in RECURRENT:
        prompts, max_tokens = prompts + [LONG_PROMPT], max_tokens + [LONG_MAX_TOKENS]
    expected = expected_scored(ours, prompts, max_tokens)
    cluster.deploy(ours, 2)
    got = concurrently(lambda i: _scored(http_complete(cluster.base, prompts[i], max_tokens[i], logprobs=1)),
                       range(len(prompts)))
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    for (_, logprobs), (_, want) in zip(got, expected):
        assert logprobs == pytest.approx(want, abs=1e-4)
    if name == "DeepSeek-V4-Flash":
        _hash_routing_is_traced_and_counted(cluster.base, ours)


def expected_scored(model: str, prompts, max_tokens) -> list[tuple[list[int], list[float]]]:
    """The in-process engine's greedy tokens and each one's logprob. Tokens alone can be blind: a tiny random model
    with tied embeddings (Granite 4.0-H's) repeats the prompt's last token whatever its recurrent state
    holds, while the logprob (a softmax over every logit) still reads that state."""
    engine = LLMEngine.from_pretrained(model, max_model_len=512)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0, logprobs=1) for m in max_tokens])
    return [(o.token_ids, [s.logprob for s in o.logprobs]) for o in outs]


def _scored(body: dict) -> tuple[list[int], list[float]]:
    choice = body["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def _hash_routing_is_traced_and_counted(base: str, path: str) -> None:
    """Served, a hash-routed layer's trace names the fixed table's experts for the token fed, and its rows
    count as expert load like any other layer's (usage.expert_tokens: every layer, top-k rows per token)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    tensors = load_file(str(Path(path) / "model.safetensors"))
    prompt, steps = [9, 99, 199, 42], 4
    body = http_complete(base, prompt, steps, return_routing=True, ignore_eos=True)
    choice, usage = body["choices"][0], body["usage"]
    fed = prompt[-1:] + choice["token_ids"][:-1]  # the input of the forward pass that chose each token
    for layer in range(cfg["num_hash_layers"]):
        table = tensors[f"layers.{layer}.ffn.gate.tid2eid"]
        assert [sorted(token[layer]["expert_ids"]) for token in choice["routing"]] == \
            [sorted(table[t].tolist()) for t in fed]
    computed = len(prompt) + steps - 1
    assert usage["expert_tokens"] == computed * cfg["num_hidden_layers"] * cfg["num_experts_per_tok"]
