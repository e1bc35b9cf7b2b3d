"""generation_config.json (stop ids, default sampling), BOS as transformers' tokenizer adds it, and
checkpoints whose tokenizer we cannot read."""
import json
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from cluster.engine import InvalidRequest, LLMEngine, SamplingParams
from cluster.tokenizer import TextTokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture
def model_dir(checkpoint_factory, tmp_path):
    return shutil.copytree(checkpoint_factory("mixtral"), tmp_path / "m")


def test_generation_config_eos_ids_join_the_stop_set(model_dir):
    full = LLMEngine.from_pretrained(str(model_dir)).generate([[3, 1, 4]], GREEDY)[0].token_ids
    stop = full[5]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 127], "bos_token_id": 1}))
    engine = LLMEngine.from_pretrained(str(model_dir))
    assert {stop, 127} <= set(engine.stop_ids)
    out = engine.generate([[3, 1, 4]], GREEDY)[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(stop) + 1]
    ignored = engine.generate([[3, 1, 4]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == full


def test_generation_config_sampling_applies_when_the_request_gives_none(model_dir):
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                                   "do_sample": True}))
    engine = LLMEngine.from_pretrained(str(model_dir))
    assert engine.default_sampling == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    given_none = engine.with_defaults(SamplingParams(max_tokens=4))
    assert (given_none.temperature, given_none.top_p, given_none.top_k) == (0.6, 0.95, 20)
    given = engine.with_defaults(SamplingParams(max_tokens=4, temperature=0.0, top_k=0))
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 0.95, 0)


def test_greedy_generation_config_makes_plain_requests_greedy(model_dir):
    greedy = LLMEngine.from_pretrained(str(model_dir)).generate([[3, 1, 4]], GREEDY)[0].token_ids
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    engine = LLMEngine.from_pretrained(str(model_dir))
    assert engine.generate([[3, 1, 4]], SamplingParams(max_tokens=12, seed=5))[0].token_ids == greedy
    (model_dir / "generation_config.json").unlink()
    assert LLMEngine.from_pretrained(str(model_dir)).default_sampling == {}


def _tokenizer_dir(path, template: bool, flags: dict):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", **flags}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("template", [False, True], ids=["no-post-processor", "bos-template"])
@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False},
                                   {"add_bos_token": True, "add_eos_token": True}],
                         ids=["no-flags", "add_bos", "no_bos", "bos+eos"])
def test_special_tokens_as_transformers_adds_them(tmp_path, template, flags):
    """tokenizer.json's post-processor decides; transformers 5 drops tokenizer_config's add_bos_token."""
    from transformers import AutoTokenizer

    path = _tokenizer_dir(tmp_path / "tok", template, flags)
    text = "hello world again"
    expected = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    assert TextTokenizer.from_checkpoint(path).encode(text) == expected


def test_tokenizer_without_tokenizer_json_is_refused_clearly(model_dir):
    (model_dir / "tiktoken.model").write_text("aGVsbG8= 0\n")  # what Kimi-K2 ships, with its own Python code
    engine = LLMEngine.from_pretrained(str(model_dir))
    assert engine.tokenizer is None
    with pytest.raises(InvalidRequest, match=r"ships tiktoken\.model but no tokenizer\.json.*send token ids") as e:
        engine.encode("hello")
    assert e.value.param == "prompt"
    assert engine.generate([[1, 2]], SamplingParams(max_tokens=2, temperature=0))[0].token_ids
