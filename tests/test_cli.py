"""`moe-cluster generate` as a user runs it: a real subprocess on real checkpoints."""
import json
import subprocess
import sys

import pytest

from cluster.engine import LLMEngine, SamplingParams


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


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


def test_plan_needs_only_config_json(tmp_path):
    from tests.published_configs import PUBLISHED

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED["Mixtral-8x7B-Instruct-v0.1"]))  # no weights at all
    r = _cli("plan", "--model", str(tmp_path), "--workers", "4", "--gpu-memory", "80GiB", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["fits"] and plan["dtype"] == "bfloat16" and plan["experts_per_worker"] == 64
    text = _cli("plan", "--model", str(tmp_path / "config.json"), "--dtype", "float32", "--max-model-len", "4096",
                "--workers", "8")
    assert text.returncode == 0 and "46.70 B total, 12.88 B active per token" in text.stdout
    assert "weights float32" in text.stdout and "fits: yes" in text.stdout
    bad = _cli("plan", "--model", str(tmp_path), "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory: cannot read 'lots'" in bad.stderr


def test_counts_must_be_positive_and_the_bundled_paths_resolve_from_anywhere(tmp_path, monkeypatch):
    """--max-model-len 0 was read as "not given" (the model's whole context); and the bundled config's
    relative paths (models/demo, deployments/policies/) failed outside the project's root."""
    from deployments import cli

    r = _cli("plan", "--model", "models/demo", "--max-model-len", "0")
    assert r.returncode == 2 and "--max-model-len: must be at least 1, not 0" in r.stderr
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert cli._local_path("mine") == str(tmp_path / "mine")  # the user's own, from where the command runs
    assert cli._local_path("models/demo") == str(cli.PROJECT_ROOT / "models" / "demo")
    assert cli._local_path("nowhere/x") == "nowhere/x"  # left as written: its error names it so
    from pathlib import Path

    from deployments.config import load_serve_config

    args = cli.build_parser().parse_args(["serve"])
    app = load_serve_config(args.config)["applications"][0]  # the bundled config, read from tmp_path
    resolved = cli._config_paths(app["args"])
    assert Path(resolved["model"], "config.json").exists() and Path(resolved["policy_file"]).exists()


_APP = {"model": "models/demo", "num_workers": 1}


@pytest.mark.parametrize("text,message", [
    ("applications: [ - oops", "not valid YAML (while parsing a flow node"),
    ({"applications": [{"args": ["model", "models/demo"]}]}, "applications[0].args must be a mapping"),
    ({"applications": [{"args": {**_APP, "routers": "2"}}]}, "routers: expected a mapping (min, max, ...), got '2'"),
    ({"applications": [{"args": {**_APP, "tiers": [{"name": "fast", "count": 1, "budget_bytes": "1GiB"}]}}]},
     "bad application config: tiers: a host tier is needed"),  # a whole-model check: no empty location first
    ({"applications": [{"args": {"model": "models/demo", "tiers": [
        {"name": "fast", "count": 1, "device": "cuda", "num_gpus": 1, "budget_bytes": "1MiB"},
        {"name": "host", "count": 1, "budget_bytes": "1GiB"}]}}]},
     "the config needs 1 GPU(s) (tier 'fast' 1) and this machine has 0"),  # Serve waited for it forever
    ({"applications": [{"args": {**_APP, "worker": {"num_gpus": 0.5}}}]},
     "needs 0.5 GPU(s) (expert workers 0.5) and this machine has 0"),
    ({"applications": [{"args": {**_APP, "api_key": ""}}]}, "the API key is empty"),  # an open server
])
def test_serve_config_errors_are_one_line_before_ray_starts(tmp_path, text, message):
    import os

    import yaml

    path = tmp_path / "serve.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text))
    r = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--config", str(path)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [x for x in r.stderr.splitlines() if not x.startswith("starting moe-cluster")]
    assert r.returncode == 2 and lines == [f"moe-cluster: error: {lines[0].removeprefix('moe-cluster: error: ')}"]
    assert message in lines[0] and ": : " not in lines[0] and "Value error" not in lines[0]


class _Draining:
    """The controller's drain calls, as `moe-cluster serve` makes them: 2 requests that never finish."""

    def __init__(self):
        self.calls = []
        for name in ("start_drain", "in_flight", "cut"):
            setattr(self, name, _Call(self, name))


class _Call:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def remote(self):
        self.owner.calls.append(self.name)
        return self

    def result(self, timeout_s):
        return 2 if self.name == "in_flight" else None


def test_a_second_stop_signal_cuts_the_drain_at_once(capsys):
    """A second Ctrl-C did nothing: the server drained on for up to drain_timeout_s (30 s by default).
    The handlers only count (a handler that takes a lock can deadlock the main thread it interrupts)."""
    import os
    import signal
    import threading

    from deployments.stopping import StopSignals, drain

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signals = StopSignals()
        os.kill(os.getpid(), signal.SIGTERM)
        signals.wait_stop()
        assert signals.stop and not signals.cut
        controller = _Draining()
        draining = threading.Thread(target=drain, args=(controller, 3600.0, signals))
        draining.start()
        for _ in range(500):  # until the drain is under way
            if controller.calls.count("in_flight") >= 2:
                break
            draining.join(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        draining.join(60)
        assert not draining.is_alive() and signals.cut
        assert controller.calls[0] == "start_drain" and controller.calls[-1] == "cut"
        err = capsys.readouterr().err
        assert "draining 2 in-flight request(s) (up to 3600 s; Ctrl-C again" in err
        assert "stop asked again: 2 request(s) cut off" in err
        os.kill(os.getpid(), signal.SIGTERM)  # a third: counted, nothing more (the removal runs on)
        assert signals.count == 3
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_serve_and_plan_refuse_what_they_used_to_take_silently(tmp_path):
    """Each was accepted: a taken port (or one port for HTTP and gRPC) failed after the Ray start in a
    65-line HAProxy traceback; an empty --api-key served every route to anyone; --max-model-len above the
    model's context was capped to it; plan said a model fits at --gpu-memory-utilization 1.5, and read --gpu-memory 80 as 80 bytes."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli("serve", "--http-port", str(port))
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is taken" in r.stderr and "--http-port" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("serve", "--http-port", "8100", "--grpc-port", "8100")  # the same port twice: taken by the first
    assert r.returncode == 2 and "--http-port and --grpc-port are both 8100" in r.stderr, r.stderr[-2000:]
    r = _cli("serve", "--api-key", "")
    assert r.returncode == 2 and "the API key is empty" in r.stderr
    r = _cli("serve", "--max-model-len", "5000")
    assert r.returncode == 2 and "--max-model-len 5000 is above the model's context length (1024" in r.stderr
    r = _cli("generate", "--max-model-len", "5000", "--prompt", "x")
    assert r.returncode == 2 and "above the model's context length (1024" in r.stderr
    r = _cli("plan", "--model", "models/demo", "--gpu-memory-utilization", "1.5")
    assert r.returncode == 2 and "--gpu-memory-utilization: must be in (0, 1], not 1.5" in r.stderr
    r = _cli("plan", "--model", "models/demo", "--gpu-memory", "80")
    assert r.returncode == 2 and "'80' has no unit: e.g. 80GiB" in r.stderr
