"""`moe-cluster generate` as a user runs it: a real subprocess on real checkpoints."""
import json
import subprocess
import sys

import pytest

from cluster.engine import LLMEngine, SamplingParams


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_matches_engine(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    r = _cli("generate", "--model", path, "--prompt-ids", "1,2,3", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = LLMEngine.from_pretrained(path).generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out["token_ids"] == expected.token_ids and "text" in out
    assert out["usage"]["completion_tokens"] == len(expected.token_ids)
    assert "loading backbone" in r.stderr  # progress is shown on stderr


def test_sampling_flags_and_seed(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    args = ("generate", "--model", path, "--prompt-ids", "4,5", "--max-tokens", "8", "--temperature", "1.0",
            "--seed", "11", "--json", "--quiet")
    a, b = _cli(*args), _cli(*args)
    assert a.returncode == 0 and json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    assert a.stderr == ""


@pytest.mark.parametrize("args,message", [
    (("--model", "/nonexistent/model", "--prompt-ids", "1"), "checkpoint directory not found"),
    (("--prompt-ids", "1,x"), "--prompt-ids: expected comma-separated integers"),
    (("--prompt-ids", "1", "--max-tokens", "0"), "max_tokens: must be an integer"),
    (("--prompt-ids", "999999"), "token id 999999 is outside"),
])
def test_errors_are_one_clear_line(args, message, checkpoint_factory):
    base = ("generate", "--model", str(checkpoint_factory("mixtral")))
    r = _cli(*base, *args, "--quiet")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
