"""The bundled demo model: a standard HF checkpoint, parity with transformers, specialised routing."""
import json
import sys

import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from tests.helpers import DEMO, hf_greedy_logits, load_hf

sys.path.insert(0, str(DEMO.parent.parent / "tools"))


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_pretrained(str(DEMO), max_num_seqs=8, max_model_len=512)


def test_is_a_small_standard_checkpoint():
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert (DEMO / "tokenizer.json").exists() and (DEMO / "README.md").exists()
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 25 * 2**20, size


def test_transformers_gives_the_same_greedy_tokens(engine):
    from transformers import AutoTokenizer

    hf, tok = load_hf(DEMO), AutoTokenizer.from_pretrained(DEMO)
    for text in ["def parse_args(argv):\n    ", "The Python language reference describes", "import os\n"]:
        prompt = tok(text)["input_ids"]
        assert prompt == engine.encode(text)
        hf_tokens, _ = hf_greedy_logits(hf, prompt, 32)
        out = engine.generate([text], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == hf_tokens
        assert out.text == tok.decode(hf_tokens, skip_special_tokens=True)


def test_stop_strings_cut_the_text(engine):
    full = engine.generate(["def main():\n"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = full.text[10:13]
    out = engine.generate(["def main():\n"], SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]
    assert stop not in out.text


def test_routing_is_domain_specialised():
    from routing_stats import report

    torch.manual_seed(0)
    result = report(str(DEMO), count=16, length=128)
    assert result["max_hottest_over_mean"] >= 1.5
    assert max(r["tv_distance_code_vs_prose"] for r in result["layers"]) >= 0.1


def test_streamed_deltas_add_up_to_the_final_text(engine):
    from cluster.engine import SamplingParams as SP

    full = engine.generate(["class Foo:\n"], SP(max_tokens=40, temperature=0, ignore_eos=True))[0].text
    for stop in ((), (full[12:15],)):
        rid = engine.add_request("class Foo:\n", SP(max_tokens=40, temperature=0, ignore_eos=True, stop=stop))
        deltas, final = [], None
        while engine.has_unfinished():
            for o in engine.step():
                assert o.request_id == rid
                deltas.append(o.text_delta)
                final = o
        expected = full[: full.find(stop[0])] if stop else full
        assert "".join(deltas) == expected and final.finish_reason == ("stop" if stop else "length")
