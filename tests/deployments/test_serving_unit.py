"""The ingress's request path without a cluster: where the expensive work runs."""
import asyncio
import threading

from deployments.api.schema import ChatCompletionRequest, CompletionRequest
from deployments.api.serving import Serving
from deployments.config import app_config
from tests.deployments.helpers import NoRouters
from tests.helpers import DEMO


def test_tokenising_and_chat_templates_run_off_the_event_loop():
    """A huge prompt must not stall other streams: encoding and rendering run on the pool's threads."""
    serving = Serving(app_config({"model": str(DEMO)}), NoRouters())
    seen = []
    encode, render = serving.checker.encode, serving.templates.render

    def spy_encode(prompt):
        seen.append(("encode", threading.current_thread().name))
        return encode(prompt)

    def spy_render(*args, **kwargs):
        seen.append(("render", threading.current_thread().name))
        return render(*args, **kwargs)

    serving.checker.encode = spy_encode
    object.__setattr__(serving, "templates", type("T", (), {"render": staticmethod(spy_render)})())

    async def run():
        loop_thread = threading.current_thread().name
        await serving.completion_choices(CompletionRequest(prompt="def main(" * 300, max_tokens=1))
        await serving.chat_choices(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=1))
        return loop_thread

    loop_thread = asyncio.run(run())
    assert [k for k, _ in seen] == ["encode", "render"]
    assert all(name != loop_thread and name.startswith("tokenize") for _, name in seen)


def test_a_chat_template_error_is_a_400_with_the_templates_message(tmp_path):
    """raise_exception in a checkpoint's template (e.g. 'roles must alternate') → 400, never a 500."""
    import json
    import shutil

    import pytest

    from deployments.api.errors import classify

    model = tmp_path / "demo"
    shutil.copytree(DEMO, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m.role == 'system' %}"
                               "{{ raise_exception('System messages are not supported') }}{% endif %}"
                               "{{ m.content }}{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    serving = Serving(app_config({"model": str(model)}), NoRouters())
    req = ChatCompletionRequest(messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
                                max_tokens=1)
    with pytest.raises(Exception) as e:
        asyncio.run(serving.chat_choices(req))
    error = classify(e.value)
    assert error.status == 400 and "System messages are not supported" in error.message
    assert error.param == "messages"


def test_coalesce_sends_the_first_output_at_once_then_groups_of_the_interval():
    from deployments.router import coalesce

    async def steps():
        for step in [[1], [2], [3, 4], [5], [6], [7], [8]]:  # what the engine yields, step by step
            yield step

    async def collect(size):
        return [g async for g in coalesce(steps(), size)]

    assert asyncio.run(collect(1)) == [[1], [2], [3, 4], [5], [6], [7], [8]]
    assert asyncio.run(collect(3)) == [[1], [2, 3, 4], [5, 6, 7], [8]]  # the rest when the stream ends
    assert asyncio.run(collect(64)) == [[1], [2, 3, 4, 5, 6, 7, 8]]


def test_client_errors_are_answered_without_a_server_failure():
    """A bad request is answered 400 by its own handler. Starlette's catch-all answers too, but then
    re-raises, and Serve logs every such request as "Request failed." with a 60-line traceback: the
    transport here re-raises what the app raises, as Serve's replica does. Unforeseen errors still are.
    Each refused generation request is counted once in moe_requests_total, by its outcome."""
    import httpx2
    import pytest

    from deployments import metrics
    from deployments.api.http import build_http_app
    from tests.deployments.helpers import IngressStub

    def counted(outcome: str) -> float:
        return metrics.API.get_sample_value("moe_requests_total", {"api": "http", "outcome": outcome}) or 0.0

    serving = Serving(app_config({"model": str(DEMO)}), NoRouters())
    app = build_http_app(IngressStub(serving))
    bad = [{"max_tokens": 0}, {"temperature": -1}, {"logit_bias": {"x": 1}}, {"messages": [{"role": "nobody"}]},
           {"max_tokens": "5"}, {"max_tokens": True}, {"stream": "yes"}]  # the last three: guessed, were 200

    async def post(body):
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=body)

    rejected, failed = counted("rejected"), counted("failed")
    for extra in bad:
        r = asyncio.run(post({"messages": [{"role": "user", "content": "hi"}], **extra}))
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (extra, r.text)
    assert asyncio.run(post({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})).status_code == 404
    assert counted("rejected") == rejected + len(bad) + 1

    def broken(req):
        raise RuntimeError("a bug")

    serving.chat_choices = broken
    with pytest.raises(RuntimeError, match="a bug"):  # unforeseen: re-raised for the server to log
        asyncio.run(post({"messages": [{"role": "user", "content": "hi"}]}))
    assert counted("failed") == failed + 1 and counted("rejected") == rejected + len(bad) + 1


def test_grpc_calls_answered_with_a_clients_status_log_no_traceback():
    """Serve logs a gRPC call that raised after set_code as failed, with its traceback, wrapped in its
    gRPCStatusError: the filter drops those records for statuses below 500, and only those."""
    import logging

    from ray.serve._private.grpc_util import gRPCStatusError

    from deployments.api.errors import ApiError
    from deployments.api.grpc import AnsweredCallFilter

    def record(exc):
        try:
            raise exc
        except Exception as e:  # noqa: BLE001
            return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", (), (type(e), e, None))

    def wrapped(inner):
        try:
            raise inner
        except ApiError as e:
            try:
                raise gRPCStatusError(original_exception=e, code=e.grpc_code, details=e.message) from e
            except gRPCStatusError as outer:
                return outer

    keep = AnsweredCallFilter().filter
    assert not keep(record(ApiError(400, "max_tokens: must be ≥ 1", "max_tokens")))
    assert not keep(record(wrapped(ApiError(401, "missing key"))))
    assert keep(record(wrapped(ApiError(500, "internal error"))))
    assert keep(record(RuntimeError("a bug")))
    assert keep(logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "CALL Complete OK", (), None))


def test_models_retrieve_by_name_as_the_openai_sdk_asks():
    import httpx2
    import openai
    import pytest

    from deployments.api.http import build_http_app
    from tests.deployments.helpers import IngressStub

    serving = Serving(app_config({"model": str(DEMO), "served_model_name": "org/demo-7b"}), NoRouters())
    transport = httpx2.ASGITransport(build_http_app(IngressStub(serving)))

    async def run():
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                                      http_client=httpx2.AsyncClient(transport=transport)) as client:
            listed = [m.id async for m in client.models.list()]
            card = await client.models.retrieve("org/demo-7b")
            with pytest.raises(openai.NotFoundError) as missing:
                await client.models.retrieve("gpt-9")
            return listed, card, missing.value

    listed, card, missing = asyncio.run(run())
    assert listed == [card.id] == ["org/demo-7b"] and card.object == "model"
    assert missing.body["param"] == "model" and "gpt-9" in missing.body["message"]


def test_checks_across_fields_name_a_field_in_param():
    """A check across fields names one of them, not the first word of its message ("give" once)."""
    import pydantic
    import pytest

    from deployments.api.body import validation_error
    from deployments.api.schema import TokenizeRequest

    msg = [{"role": "user", "content": "hi"}]
    cases = [(ChatCompletionRequest, {"messages": msg, "max_tokens": 2, "max_completion_tokens": 2}),
             (ChatCompletionRequest, {"messages": msg, "top_logprobs": 2}),
             (ChatCompletionRequest, {"messages": msg, "tool_choice": "required"}),
             (CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}}),
             (TokenizeRequest, {}), (TokenizeRequest, {"prompt": "x", "messages": msg})]
    for model, body in cases:
        with pytest.raises(pydantic.ValidationError) as e:
            model.model_validate(body)
        error = validation_error(e.value)
        assert error.param in model.model_fields, (body, error.param, error.message)
    with pytest.raises(pydantic.ValidationError) as e:  # it was named `logprobs`, the engine's name for it
        ChatCompletionRequest.model_validate({"messages": msg, "logprobs": True, "top_logprobs": 50})
    assert validation_error(e.value).param == "top_logprobs"


def test_logprobs_carry_a_tokens_own_bytes_and_completions_the_chosen_token():
    """Over the real HTTP app and the demo engine: chat's `bytes` of a token holding part of a character
    is that byte (0xCA), not U+FFFD's three; a completion's top_logprobs holds the chosen token too."""
    import httpx2

    from cluster.engine import LLMEngine
    from cluster.engine.async_engine import AsyncEngine
    from deployments.api.http import build_http_app
    from tests.deployments.helpers import IngressStub
    from tests.helpers import GeneratorClient

    serving = Serving(app_config({"model": str(DEMO)}), NoRouters())
    engine = AsyncEngine(LLMEngine.from_pretrained(str(DEMO)))
    partial = 135  # "Ê" in the byte-level alphabet: the byte 0xCA, the start of a two-byte character

    async def run():
        serving.client = GeneratorClient(engine.generate, engine.shutdown)
        serving.cut = asyncio.Event()
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(build_http_app(IngressStub(serving))),
                                      base_url="http://test") as client:
            chat = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
                "top_logprobs": 2, "logit_bias": {str(partial): 100}})
            cmpl = await client.post("/v1/completions", json={
                "prompt": "def main(", "max_tokens": 6, "temperature": 1.5, "seed": 3, "logprobs": 0, "echo": True})
            return chat.json(), cmpl.json()

    try:
        chat, cmpl = asyncio.run(run())
    finally:
        engine.shutdown()
    content = chat["choices"][0]["logprobs"]["content"]
    assert [c["bytes"] for c in content] == [[0xCA], [0xCA]] and content[0]["token"] == "\ufffd"
    lp = cmpl["choices"][0]["logprobs"]
    scored = [(tok, top) for tok, top in zip(lp["tokens"], lp["top_logprobs"]) if top is not None]
    assert len(scored) == len(lp["tokens"]) - 1  # every token but the first echoed one
    assert all(list(top) == [tok] for tok, top in scored)  # logprobs 0: the chosen token alone


def test_a_request_cut_before_its_router_admits_it_is_counted_cancelled():
    """The client went away while `_generate` awaited the stream's head (the ingress's handle waiting for a
    router replica with room, or the router's admission): it was counted under no outcome."""
    from types import SimpleNamespace

    from deployments import metrics
    from deployments.api.errors import CANCELLED
    from deployments.api.http import _generate

    closed, counter = [], metrics.REQUESTS.labels("http", CANCELLED)

    async def stream(choices):
        try:
            await asyncio.Event().wait()  # the routers never admit it
            yield 0, []
        finally:
            closed.append(True)

    async def run():
        req = CompletionRequest(prompt="x", max_tokens=1)
        task = asyncio.ensure_future(_generate(SimpleNamespace(stream=stream), "cmpl-1", [], req, chat=False,
                                               echo=False, with_logprobs=False))
        for _ in range(10):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task

    before = counter._value.get()
    assert asyncio.run(run()).cancelled()
    assert counter._value.get() == before + 1 and closed == [True]


def test_a_request_without_the_key_is_counted_once_and_only_on_generation_routes():
    """A refused completion counted twice under unauthorized (the key check and the refusal), and every
    /metrics scrape or /admin call without the key once: a scraper with a stale key inflated it."""
    import httpx2

    from deployments import metrics
    from deployments.api.http import build_http_app
    from tests.deployments.helpers import IngressStub

    def unauthorized() -> float:
        return metrics.API.get_sample_value("moe_requests_total", {"api": "http", "outcome": "unauthorized"}) or 0.0

    serving = Serving(app_config({"model": str(DEMO), "api_key": "k"}), NoRouters())
    app = build_http_app(IngressStub(serving))

    async def run():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://test") as client:
            r = await client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"})
            assert r.status_code == 401
            r = await client.post("/v1/chat/completions", json={"messages": []})
            assert r.status_code == 401
            for path in ("/metrics", "/admin/load", "/v1/models"):
                assert (await client.get(path)).status_code == 401

    before = unauthorized()
    asyncio.run(run())
    assert unauthorized() == before + 2


def test_a_special_tokens_chat_logprob_is_named_as_its_bytes_spell_it():
    """`token` was "" (the reply's text skips special tokens) while `bytes` spelled <|endoftext|>."""
    from cluster.engine.sampling import Sampled
    from cluster.tokenizer import TextTokenizer
    from deployments.api.responses import TokenText, chat_logprobs

    tok = TextTokenizer.from_checkpoint(str(DEMO))
    eos = 0  # the demo's <|endoftext|>
    [entry] = chat_logprobs([Sampled(eos, -0.5, ((eos, -0.5),))], TokenText(tok))["content"]
    assert entry["token"] == "<|endoftext|>" and bytes(entry["bytes"]) == b"<|endoftext|>"
    assert entry["top_logprobs"][0]["token"] == "<|endoftext|>"


def test_a_special_tokens_completion_logprob_is_named_and_adds_no_text(tmp_path):
    """Legacy completions named a special token "" (two specials among top_logprobs became one key);
    it is named as its bytes spell it, and its text_offset step stays 0 (the text skips it)."""
    from tokenizers import AddedToken, Tokenizer

    from cluster.engine.sampling import Sampled
    from cluster.tokenizer import TextTokenizer
    from deployments.api.responses import TokenText, completion_logprobs

    raw = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    raw.add_special_tokens([AddedToken("<|im_end|>", special=True)])  # a second special, as chat models have
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_checkpoint(tmp_path)
    eos, end = 0, tok.tok.token_to_id("<|im_end|>")
    word = tok.encode("hello", add_special_tokens=False)[0]
    scored = [(eos, Sampled(eos, -0.5, ((eos, -0.5), (end, -1.5)))), (word, Sampled(word, -0.1, ()))]
    out = completion_logprobs(scored, TokenText(tok), TokenText(tok).starts([t for t, _ in scored], 3))
    assert out["tokens"] == ["<|endoftext|>", tok.decode([word])]
    assert out["top_logprobs"] == [{"<|endoftext|>": -0.5, "<|im_end|>": -1.5}, {tok.decode([word]): -0.1}]
    assert out["text_offset"] == [3, 3]  # the special token adds nothing to the text


def test_text_offsets_place_each_token_in_the_text_streamed_or_not():
    """Through the real HTTP app and engine (demo model): text_offset summed each token's own decoded
    length, so every part of a split character counted one U+FFFD (offsets past the end of the text);
    streamed, it counted the text sent so far, which a stop string holds back (every offset lagged by
    its length - 1, and echoed offsets ran on into the generated ones)."""
    from cluster.engine import LLMEngine
    from cluster.tokenizer import TextTokenizer
    from tests.deployments.helpers import openai_over_engine

    serving = Serving(app_config({"model": str(DEMO)}), NoRouters())
    engine = LLMEngine.from_pretrained(str(DEMO), max_num_seqs=4)
    tok = TextTokenizer.from_checkpoint(str(DEMO))
    prompt = "héllo wörld 日本 def main("
    split = [i for i in range(tok.tok.get_vocab_size()) if tok.decode([i]) == "\ufffd"][:2]
    asks = [dict(prompt=prompt, echo=True), dict(prompt="def main(", stop=["zzz"]),
            dict(prompt="def main(", logit_bias={str(t): 100 for t in split}, stop=["\n\n\n"])]

    async def use(client, name):
        out = []
        for ask in asks:
            kw = dict(model=name, max_tokens=12, temperature=0, logprobs=1, **ask)
            whole = (await client.completions.create(**kw)).choices[0]
            chunks = [c.choices[0] async for c in await client.completions.create(stream=True, **kw) if c.choices]
            out.append((whole, chunks))
        return out

    for ask, (whole, chunks) in zip(asks, openai_over_engine(serving, engine, use)):
        offsets, text = whole.logprobs.text_offset, whole.text
        assert offsets == sorted(offsets) and offsets[-1] <= len(text), (ask, offsets, len(text))
        assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == offsets, ask
        assert "".join(c.text for c in chunks) == text
        echoed = tok.encode(prompt) if ask.get("echo") else []
        want = _offsets(tok, echoed, 0) + _offsets(tok, whole.token_ids, len(prompt) if echoed else 0)
        assert offsets == want, (ask, offsets, want)


def _offsets(tok, ids: list[int], start: int) -> list[int]:
    """Where each token starts in its text: the length of the text of the tokens before it, less a
    character they have not finished (U+FFFD at the end)."""
    return [start + len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def test_response_format_errors_read_as_one_plain_sentence():
    """The field was named twice ("response_format: response_format: ..."), and a schema xgrammar refuses
    came back with xgrammar's log time and C++ source line ("[05:24:31] /project/cpp/...cc:4944: ...")."""
    import pytest
    from pydantic import ValidationError

    from cluster.engine.grammar import GrammarSpec, check
    from deployments.api.body import validation_error

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "response_format": {"type": "json_schema"}})
    err = validation_error(e.value)
    assert (err.param, err.message) == ("response_format", "response_format: json_schema is given with type "
                                                           "json_schema, and only then")
    with pytest.raises(ValueError) as bad:
        check(GrammarSpec.json_schema({"type": "nonsense"}))
    assert str(bad.value) == 'unsupported or invalid JSON schema: Unsupported type "nonsense"'


def test_the_bearer_scheme_is_case_insensitive():
    """RFC 9110: `Authorization: bearer KEY` is the same as `Bearer KEY`; both APIs refused it."""
    import httpx2

    from deployments.api.grpc import api_key_of
    from deployments.api.http import build_http_app
    from tests.deployments.helpers import IngressStub

    serving = Serving(app_config({"model": str(DEMO), "api_key": "k"}), NoRouters())
    app = build_http_app(IngressStub(serving))

    async def run():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://test") as client:
            return [(await client.get("/v1/models", headers={"Authorization": auth})).status_code
                    for auth in ("Bearer k", "bearer k", "BEARER  k", "bearer no", "Basic k", "k")]

    assert asyncio.run(run()) == [200, 200, 200, 401, 401, 401]
    assert [api_key_of([("authorization", a)]) for a in ("bearer k", "Bearer k", "Basic k")] == ["k", "k", None]


def test_a_prompt_of_no_allowed_shape_is_named_in_one_sentence():
    """A batch mixing text and token ids was refused as `prompt.str: Input should be a valid string`
    (pydantic's error for the first of the four shapes), which does not say what is wrong."""
    import pytest
    from pydantic import ValidationError

    from deployments.api.body import validation_error

    for prompt in (["def a(", [5, 17, 33]], {"text": "x"}, 5):
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate({"prompt": prompt})
        err = validation_error(e.value)
        assert err.param == "prompt" and "one kind per batch" in err.message and ".str" not in err.message
    assert CompletionRequest.model_validate({"prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]


def test_detokenize_gives_back_the_text_tokenize_read():
    """/detokenize skipped special tokens, so a chat's /tokenize ids came back without its markers
    ('user\\nHi\\nassistant\\n'); vLLM keeps them."""
    serving = Serving(app_config({"model": str(DEMO)}), NoRouters())
    text = "<|endoftext|>def main(<|endoftext|>"
    assert serving.detokenize(serving.checker.encode(text)) == text
