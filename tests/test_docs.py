"""The docs as a new user reads them (README.md, docs/*.md): every YAML block loads through the
project's own loaders, every `moe-cluster` and bench flag they show exists (required ones given),
bash blocks paste as written, every metric, path and test they name exists, and the outputs they
print (`moe-cluster plan`, README's curl reply) are what the code prints. Fast, no Ray."""
import io
import re
import shlex
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from deployments import metrics
from deployments.cli import build_parser, main
from deployments.config import app_config
from deployments.policy import AutoscalePolicy, load_policy

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Kubernetes pod fields shown beside an application arg (docs/kubernetes.md): not ours to validate.
POD_FIELDS = {"volumeMounts", "volumes"}
NOT_METRICS = {"moe_latent_size"}  # a checkpoint's config field (Nemotron 3 Super), named in docs/models.md


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(file:line, body) of every fenced block in `lang`."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S):
            found.append((f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return found


def _is_policy(data: dict) -> bool:
    return set(data) <= set(AutoscalePolicy.model_fields)


@pytest.mark.parametrize("where,body", _blocks("yaml"), ids=[w for w, _ in _blocks("yaml")])
def test_every_yaml_block_loads(where, body, tmp_path):
    data = {k: v for k, v in yaml.safe_load(body).items() if k not in POD_FIELDS}
    if _is_policy(data):  # a policy file, read as `policy_file` reads it
        path = tmp_path / "policy.yaml"
        path.write_text(body)
        load_policy(path)
    else:  # the Serve application's args
        app_config(data)


def test_the_policy_autoscaling_md_shows_is_the_bundled_file():
    [body] = [b for _, b in _blocks("yaml") if b.startswith("# deployments/policies/default.yaml")]
    assert yaml.safe_load(body) == yaml.safe_load((ROOT / "deployments/policies/default.yaml").read_text())


def _cli_uses() -> list[tuple[str, list[str]]]:
    """(file, argv) of every `moe-cluster SUB ...` the docs show, in code spans and bash blocks."""
    uses = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for m in re.finditer(r"moe-cluster (generate|plan|serve|record-profile)\b([^`\n#]*)", text):
            uses.append((doc.name, [m.group(1), *re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2))]))
    return uses


def test_every_flag_the_docs_show_exists():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices  # argparse keeps no public map of them
    known = {name: {o for a in sub._actions for o in a.option_strings} for name, sub in subs.items()}
    unknown = [(doc, argv[0], flag) for doc, argv in _cli_uses() for flag in argv[1:] if flag not in known[argv[0]]]
    assert len(_cli_uses()) > 10 and not unknown, unknown


def test_every_command_the_docs_show_gives_the_required_flags():
    """A use with flags is a command to copy; a bare `moe-cluster plan` only names the command."""
    subs = build_parser()._subparsers._group_actions[0].choices
    required = {name: {a.option_strings[0] for a in sub._actions if a.required} for name, sub in subs.items()}
    missing = [(doc, argv, required[argv[0]] - set(argv)) for doc, argv in _cli_uses()
               if len(argv) > 1 and required[argv[0]] - set(argv)]
    assert not missing, missing


def test_every_metric_the_docs_name_is_exported():
    named = {m for doc in DOCS for m in re.findall(r"`(moe_[a-z_]+)", doc.read_text())} - NOT_METRICS
    series = metrics.exported_series()
    families = series | {s.removesuffix("_bucket") for s in series}  # a histogram is named by its family too
    assert len(named) > 20 and named <= families, named - families


def _plan_examples() -> list[tuple[str, str]]:
    [body] = [b for _, b in _blocks("") if b.startswith("$ moe-cluster plan")]
    return [(cmd, out.strip()) for cmd, _, out in (part.partition("\n") for part in body.split("$ ")[1:])]


@pytest.mark.parametrize("cmd,expected", _plan_examples())
def test_plan_prints_what_models_md_shows(cmd, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(shlex.split(cmd)[1:]) == 0
    assert out.getvalue().strip() == expected


def test_the_readme_reply_is_what_the_server_builds_from_the_engine():
    """README's curl and its JSON: the demo model's greedy tokens, in the body the HTTP route returns
    (JSONResponse's compact JSON); `id` and `created` differ per request, as the README says."""
    from fastapi.responses import JSONResponse

    from cluster.engine import LLMEngine, SamplingParams
    from deployments.api.responses import ChoiceResult, TokenText, completion_body

    [shown] = [b for w, b in _blocks("json") if w.startswith("README.md")]
    engine = LLMEngine.from_pretrained(str(ROOT / "models/demo"))
    [c] = engine.generate(["def main("], SamplingParams(max_tokens=16, temperature=0))
    choice = ChoiceResult(index=0, prompt_ids=c.prompt_ids, token_ids=c.token_ids, text=c.text,
                          finish_reason=c.finish_reason, expert_tokens=c.expert_tokens, cached_tokens=c.cached_tokens)
    body = completion_body("cmpl-…", "demo", [choice], 1, TokenText(engine.tokenizer), chat=False)
    got = JSONResponse({**body, "created": 0}).body.decode().replace('"created":0', '"created":…')
    assert got == shown.strip()


def test_every_path_and_test_the_docs_cite_exists():
    """`cluster/x.py`, `tests/...::test_y` (docs/security.md cites tests relative to tests/)."""
    cited = [(doc.name, m.group(1), re.findall(r"::(\w+)", m.group(2)))
             for doc in DOCS for m in re.finditer(r"(?<![\w/.-])((?:cluster|deployments|tests|bench|tools|k8s|docs|"
                                                 r"protos|models|\.ci)/[\w./-]*\w)((?:::\w+)*)", doc.read_text())]
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    missing = [(doc, path) for doc, path, _ in cited if not (ROOT / path).exists() and not (ROOT / "tests" / path).exists()]
    missing += [(doc, name) for doc, _, names in cited for name in names if f"def {name}(" not in tests]
    assert len(cited) > 100 and not missing, missing


def test_every_bench_flag_in_the_docs_commands_exists():
    """`bench/x.py --flag` in a bash block: the script's argparse defines --flag (read from its source)."""
    unknown, seen = [], 0
    for where, body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"((?:bench|tools)/\w+\.py)([^#;|&]*)", line):
                source = (ROOT / m.group(1)).read_text()
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)):
                    seen += 1
                    if f'"{flag}"' not in source:
                        unknown.append((where, m.group(1), flag))
    assert seen > 50 and not unknown, unknown


def test_bash_blocks_hold_no_usage_notation():
    """A bash block is pasted as is: `[--flag]` is passed literally and `a|b` pipes into `b`."""
    notation = [(where, line) for where, body in _blocks("bash") for line in body.splitlines()
                if re.search(r"\[--|--[\w-]+ [\w.]+\|[\w.]+", line.split("#")[0])]
    assert not notation, notation
