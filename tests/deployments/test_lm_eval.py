"""lm-evaluation-harness, the standard way to evaluate a served model, against our server.

Two tasks from local files (no hub): a multiple-choice task (loglikelihoods: batched token-id
prompts, echo, logprobs, max_tokens 1) and a generate_until task. Run once through lm-eval's
`local-completions` client against the server and once through its transformers backend on the
same checkpoint: per-sample loglikelihoods agree within 1e-3 and generations are identical.
"""
import json
import os

import pytest

from tests.helpers import DEMO

pytestmark = pytest.mark.slow

MC = [
    {"question": "import os\nimport", "choices": [" sys", " the", " banana"], "answer": 0},
    {"question": "def main(", "choices": ["self", "):\n", " and then"], "answer": 0},
    {"question": "for i in", "choices": [" range(", " the river", " 42"], "answer": 0},
    {"question": "The quick brown", "choices": [" fox", " def", " ()"], "answer": 0},
    {"question": "class Parser:\n    def", "choices": [" __init__", " ship", " ."], "answer": 0},
    {"question": "return", "choices": [" None", " of the king", " +"], "answer": 0},
]
GEN = [{"prompt": "def main(", "target": "self"}, {"prompt": "import os\n", "target": "import"},
       {"prompt": "The history of", "target": " the"}, {"prompt": "class Node:\n    def", "target": " __init__"}]

MC_TASK = """task: moe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: moe_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in MC) + "\n")
    (d / "gen.jsonl").write_text("\n".join(json.dumps(x) for x in GEN) + "\n")
    (d / "moe_mc.yaml").write_text(MC_TASK.format(dir=d))
    (d / "moe_gen.yaml").write_text(GEN_TASK.format(dir=d))
    return d


def _evaluate(model: str, model_args: str, tasks_dir):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # local files only
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["moe_mc", "moe_gen"],
                                  task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                  batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    samples = out["samples"]
    # resps: per choice, the request's [(loglikelihood, is_greedy)]
    mc = {s["doc_id"]: [tuple(r[0]) for r in s["resps"]] for s in samples["moe_mc"]}
    gen = {s["doc_id"]: s["filtered_resps"][0] for s in samples["moe_gen"]}
    return mc, gen


def test_lm_eval_through_the_server_matches_transformers(cluster, tasks):
    server = cluster.deploy(str(DEMO), 2)
    served = _evaluate("local-completions",
                       f"model=demo,base_url={server.base}/v1/completions,tokenizer={DEMO},"
                       "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=2,max_retries=1",
                       tasks)
    reference = _evaluate("hf", f"pretrained={DEMO},dtype=float32,device=cpu", tasks)
    (mc_s, gen_s), (mc_r, gen_r) = served, reference
    assert sorted(mc_s) == sorted(mc_r) == list(range(len(MC)))
    worst = max(abs(a[0] - b[0]) for d in mc_s for a, b in zip(mc_s[d], mc_r[d]))
    print(f"\nlm-eval: {len(MC)} multiple-choice docs x 3 choices, max |loglikelihood diff| {worst:.2e}; "
          f"{len(GEN)} generations identical: {gen_s == gen_r}")
    assert worst < 1e-3
    assert all(a[1] == b[1] for d in mc_s for a, b in zip(mc_s[d], mc_r[d]))  # is_greedy agrees too
    assert gen_s == gen_r and all(isinstance(g, str) for g in gen_s.values())
