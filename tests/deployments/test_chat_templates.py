"""deployments/api/chat.py against transformers' own `apply_chat_template(..., tokenize=False)`.

Pure and fast (no Ray). Each test writes a checkpoint directory: models/demo's tokenizer.json plus a
tokenizer_config.json holding a template written for the feature under test, then renders the same
conversation with transformers (the reference) and with ours.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import PreTrainedTokenizerFast

from deployments.api.chat import ChatTemplateError, ChatTemplates
from tests.deployments.helpers import DEMO_TOKENIZER, checkpoint
from tests.deployments.released_templates import BY_FAMILY, WRITES_BOS


# Indented block tags, as templates are usually written: lstrip_blocks and trim_blocks decide the output.
TURNS = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}
[SYS] {{ message.content }}
    {% elif message.role == 'user' %}
[USER] {{ message.content }}
    {% else %}
[BOT] {% generation %}{{ message.content + eos_token }}{% endgeneration %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[BOT] {% endif %}"""
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Sum 2 and 3"},
]
TOOLS = [{"type": "function", "function": {
    "name": "météo", "description": "Weather <in> a \"city\" & 'region'",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def reference(tok, messages, *, template_kwargs=None, template_name=None, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, chat_template=template_name,
                                   **kwargs, **(template_kwargs or {}))


def assert_same(tok, ours: ChatTemplates, messages, *, reference_messages=None, **kwargs) -> str:
    """Ours renders `messages` as transformers renders `reference_messages` (default: the same)."""
    want = reference(tok, messages if reference_messages is None else reference_messages, **kwargs)
    got = ours.render(messages, **kwargs)
    assert got == want
    return got


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_bos_eos_multi_turn_and_generation_tag(tmp_path, add_generation_prompt):
    # bos given as an AddedToken dict, eos as a string: both reach the template as text
    tok, ours = checkpoint(tmp_path, TURNS, bos_token={"__type": "AddedToken", "content": "<s>", "special": True})
    more = [{"role": "assistant", "content": "5"}, {"role": "user", "content": "ok"}]
    got = assert_same(tok, ours, CONVERSATION + more, add_generation_prompt=add_generation_prompt)
    assert got.startswith("<s>\n[SYS] Be brief.\n[USER] Hi\n[BOT] Hello!<|endoftext|>\n")
    assert got.endswith("[BOT] ") == add_generation_prompt


def test_continue_final_message(tmp_path):
    tok, ours = checkpoint(tmp_path, TURNS)
    prefill = CONVERSATION + [{"role": "assistant", "content": "The sum is"}]
    got = assert_same(tok, ours, prefill, add_generation_prompt=False, continue_final_message=True)
    assert got.endswith("[BOT] The sum is")  # no eos_token after the message being continued
    with pytest.raises(ChatTemplateError, match="cannot both be set"):
        ours.render(prefill, continue_final_message=True)  # add_generation_prompt defaults to True


def test_raise_exception_carries_the_templates_message(tmp_path):
    template = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 is even) %}"
                "{{ raise_exception('Roles must alternate: message ' ~ loop.index0 ~ ' is ' ~ m.role) }}"
                "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tok, ours = checkpoint(tmp_path, template)
    assert_same(tok, ours, CONVERSATION[1:], add_generation_prompt=True)
    bad = [CONVERSATION[1], CONVERSATION[1]]
    with pytest.raises(Exception) as theirs:
        reference(tok, bad, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError) as mine:
        ours.render(bad)
    assert mine.value.message == str(theirs.value) == "Roles must alternate: message 1 is user"


def test_strftime_now(tmp_path):
    template = "Date: {{ strftime_now('%Y-%m-%d') }}\n{% for m in messages %}{{ m.content }}{% endfor %}"
    tok, ours = checkpoint(tmp_path, template)
    assert_same(tok, ours, CONVERSATION, add_generation_prompt=True)


def test_break_and_continue(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{% if m.content == 'STOP' %}{% break %}{% endif %}{{ m.role }}> {{ m.content }}\n{% endfor %}")
    tok, ours = checkpoint(tmp_path, template)
    got = assert_same(tok, ours, CONVERSATION[:3] + [{"role": "user", "content": "STOP"}, CONVERSATION[3]],
                      add_generation_prompt=True)
    assert got == "user> Hi\nassistant> Hello!\n"


def test_tojson_on_tools_does_not_escape_html_nor_unicode(tmp_path):
    template = ("{% for tool in tools %}{{ tool | tojson }}\n{{ tool.function | tojson(indent=2, sort_keys=true) }}\n"
                "{% endfor %}{{ tools | tojson(separators=(',', ':')) }}\n"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    tok, ours = checkpoint(tmp_path, template)
    got = assert_same(tok, ours, CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert "météo" in got and "<in>" in got and "& 'region'" in got and "\\u" not in got


def test_list_form_templates_default_and_tool_use(tmp_path):
    default, tool_use = "DEFAULT {{ messages[-1].content }}", "TOOLS {{ tools | length }} {{ messages[-1].content }}"
    named = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    tok, ours = checkpoint(tmp_path, named)
    assert ours.templates == tok.chat_template == {"default": default, "tool_use": tool_use}
    assert assert_same(tok, ours, CONVERSATION, add_generation_prompt=True) == "DEFAULT Sum 2 and 3"
    assert assert_same(tok, ours, CONVERSATION, tools=TOOLS, add_generation_prompt=True) == "TOOLS 1 Sum 2 and 3"
    assert assert_same(tok, ours, CONVERSATION, tools=TOOLS, template_name="default",
                       add_generation_prompt=True) == "DEFAULT Sum 2 and 3"
    with pytest.raises(ChatTemplateError, match="'nope'.*'default', 'tool_use'"):
        ours.render(CONVERSATION, template_name="nope")


def test_documents(tmp_path):
    template = ("{% set seen = dict.fromkeys(['x']) %}{% set first = dict(title=documents[0].title) %}"
                "{{ seen | tojson }} {{ first.title }}\n"
                "{% for doc in documents %}<doc {{ loop.index }} title=\"{{ doc.title }}\">{{ doc.text }}</doc>\n"
                "{% endfor %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tok, ours = checkpoint(tmp_path, template)
    docs = [{"title": "Paris", "text": "Capital of France."}, {"title": "Ünïcode", "text": "ç"}]
    got = assert_same(tok, ours, CONVERSATION, documents=docs, add_generation_prompt=True)
    assert got.startswith('{"x": null} Paris\n<doc 1 title="Paris">Capital of France.</doc>\n')


@pytest.mark.parametrize("template_kwargs", [None, {"enable_thinking": False}, {"enable_thinking": True}])
def test_chat_template_kwargs_enable_thinking(tmp_path, template_kwargs):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                "<think></think>{% else %}<think>{% endif %}{% endif %}")
    tok, ours = checkpoint(tmp_path, template)
    got = assert_same(tok, ours, CONVERSATION, template_kwargs=template_kwargs, add_generation_prompt=True)
    assert got.endswith("<think></think>") == (template_kwargs == {"enable_thinking": False})


def test_template_kwargs_override_special_tokens_but_not_request_fields(tmp_path):
    tok, ours = checkpoint(tmp_path, TURNS)
    assert_same(tok, ours, CONVERSATION, template_kwargs={"bos_token": "<BOS>"}, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="add_generation_prompt"):
        ours.render(CONVERSATION, template_kwargs={"add_generation_prompt": False})


def test_content_as_text_parts_joined_into_one_string(tmp_path):
    tok, ours = checkpoint(tmp_path, TURNS)
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    assert_same(tok, ours, parts, reference_messages=[{"role": "user", "content": "first\nsecond"}],
                add_generation_prompt=True)


def test_template_that_loops_over_content_parts_gets_the_list(tmp_path):
    template = ("{% for m in messages %}{{ m.role }}:{% if m.content is string %}{{ m.content }}{% else %}"
                "{% for part in m.content %}[{{ part.text }}]{% endfor %}{% endif %}\n{% endfor %}")
    tok, ours = checkpoint(tmp_path, template)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    got = assert_same(tok, ours, [{"role": "user", "content": parts}, {"role": "assistant", "content": "plain"}],
                      reference_messages=[{"role": "user", "content": parts},
                                          {"role": "assistant", "content": [{"type": "text", "text": "plain"}]}],
                      add_generation_prompt=False)
    assert got == "user:[first][second]assistant:[plain]"  # trim_blocks eats the newline after endif
    prefill = [{"role": "user", "content": parts}]  # continuing a message given as parts ends after its last part
    assert_same(tok, ours, prefill, add_generation_prompt=False, continue_final_message=True)


TOOL_CALL_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<assistant>{{ m.content }}"
    "{% for call in m.tool_calls %}<call id=\"{{ call.id }}\">{{ call.function.name }}("
    "{% for k, v in call.function.arguments | items %}{{ k }}={{ v | tojson }}{% endfor %})</call>{% endfor %}"
    "</assistant>\n"
    "{% elif m.role == 'tool' %}<result for=\"{{ m.tool_call_id }}\" name=\"{{ m.name }}\">{{ m.content }}</result>\n"
    "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_assistant_tool_calls_with_null_content_then_tool_message(tmp_path):
    tok, ours = checkpoint(tmp_path, TOOL_CALL_TEMPLATE)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": "3é"}'}}
    openai = CONVERSATION[1:] + [{"role": "assistant", "content": None, "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": "call_1", "name": "add", "content": "5"}]
    # what vLLM hands transformers: arguments parsed into an object, null content as ""
    parsed = {**call, "function": {"name": "add", "arguments": {"a": 2, "b": "3é"}}}
    as_vllm = openai[:-2] + [{"role": "assistant", "content": "", "tool_calls": [parsed]}, openai[-1]]
    got = assert_same(tok, ours, openai, reference_messages=as_vllm, tools=TOOLS, add_generation_prompt=True)
    assert '<call id="call_1">add(a=2b="3é")</call>' in got and '<result for="call_1" name="add">5</result>' in got


def test_reasoning_is_offered_under_every_name_transformers_uses(tmp_path):
    template = ("{% for m in messages %}{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}\n"
                "{% endfor %}")
    tok, ours = checkpoint(tmp_path, template)
    thought = [CONVERSATION[1], {"role": "assistant", "reasoning": "2+3=5", "content": "5"}, CONVERSATION[3]]
    assert "assistant|2+3=5|2+3=5|5" in assert_same(tok, ours, thought, add_generation_prompt=True)


def test_refusal_parts_and_null_fields(tmp_path):
    tok, ours = checkpoint(tmp_path, TURNS + "{% for m in messages %}{{ m.name is defined }}{% endfor %}")
    refusal = [{"role": "user", "content": "Hi", "name": None},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}]
    assert_same(tok, ours, refusal, reference_messages=[refusal[0], {"role": "assistant", "content": "No."}],
                add_generation_prompt=True)


def test_checkpoint_without_template_gets_the_plain_default(tmp_path):
    _, ours = checkpoint(tmp_path)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    got = ours.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
                      tools=[{"name": "f"}])
    assert got == ('<|tools|>\n[{"name": "f"}]\n<|user|>\nhi\n<|assistant|>\n'
                   '[{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]\n<|assistant|>\n')


# --- where templates and special tokens come from -------------------------------------------------------


def test_jinja_files_take_priority_over_tokenizer_config(tmp_path):
    (tmp_path / "additional_chat_templates").mkdir(parents=True)
    (tmp_path / "chat_template.jinja").write_text("JINJA {{ messages[0].content }}")
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("TOOL {{ tools[0].function.name }}")
    tok, ours = checkpoint(tmp_path, "CONFIG {{ messages[0].content }}")
    assert ours.templates == tok.chat_template == {"default": "JINJA {{ messages[0].content }}",
                                                  "tool_use": "TOOL {{ tools[0].function.name }}"}
    assert assert_same(tok, ours, CONVERSATION, tools=TOOLS, add_generation_prompt=True) == "TOOL météo"


def test_legacy_chat_template_json_when_the_tokenizer_has_none(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "LEGACY {{ messages | length }}"}))
    _, ours = checkpoint(tmp_path)
    assert ours.origin == "chat_template.json" and ours.render(CONVERSATION) == "LEGACY 4"


def test_special_tokens_as_transformers_reads_them(tmp_path):
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False, "special": True}
    tok, ours = checkpoint(tmp_path / "config", bos_token=added, unk_token="<unk>", pad_token=None,
                           image_token="<img>", extra_special_tokens={"audio_token": "<aud>"})
    assert ours.special_tokens == tok.special_tokens_map
    assert ours.special_tokens["bos_token"] == "<s>" and ours.special_tokens["audio_token"] == "<aud>"
    # legacy layout: no added_tokens_decoder, so special_tokens_map.json is read and wins
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>", "special": True},
                                                                "sep_token": "<sep>"}))
    tok, ours = checkpoint(legacy)
    assert ours.special_tokens == tok.special_tokens_map
    assert ours.special_tokens["eos_token"] == "</s>"


# --- failures: always ChatTemplateError, never a jinja exception -------------------------------------------


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m.content }",                       # syntax error
    "{% for m in messages %}{{ m.content }}",                      # unclosed block
    "{% break %}",                                                 # jinja compiles it, Python refuses it
    "{{ messages[0].metadata.author }}",                           # attribute of an undefined value
    "{{ messages[0].content + undefined_token }}",                 # str + undefined
    "{{ ''.__class__.__mro__ }}",                                  # sandbox escape
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['json'] }}",
    "{{ messages.append(1) }}",                                    # inputs are immutable
    "{% set ns = namespace(__class__=1) %}",                       # dunder on a namespace
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ 1 / 0 }}",
])
def test_broken_or_malicious_templates_raise_chat_template_error(tmp_path, template):
    tok, ours = checkpoint(tmp_path, template)
    with pytest.raises(Exception) as theirs:
        reference(tok, CONVERSATION, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError) as mine:
        ours.render(CONVERSATION)
    assert type(mine.value) is ChatTemplateError and mine.value.__cause__ is None, theirs.value


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\].content\[1\]: content part type 'image_url'"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "'input_audio'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content"),
    ([{"content": "no role"}], r"messages\[0\].role"),
    ([], "non-empty"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     r"messages\[0\].tool_calls\[0\].function.arguments is not valid JSON"),
    ([{"role": "user", "content": "x", "meta": object()}], r"messages\[0\].meta"),
])
def test_bad_messages_name_the_field(tmp_path, messages, field):
    _, ours = checkpoint(tmp_path, TURNS)
    with pytest.raises(ChatTemplateError, match=field):
        ours.render(messages)


def test_error_messages_stay_small(tmp_path):
    _, ours = checkpoint(tmp_path, "{{ raise_exception(messages[0].content) }}")
    with pytest.raises(ChatTemplateError) as error:
        ours.render([{"role": "user", "content": "x" * 100_000}])
    assert len(error.value.message) < 1100


def test_templates_compile_once_and_render_from_many_threads(tmp_path):
    from deployments.api.chat_jinja import compile_template

    _, ours = checkpoint(tmp_path, TURNS + "{# unique to this test #}")
    first = ours.render(CONVERSATION)
    misses = compile_template.cache_info().misses
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: ours.render(CONVERSATION), range(64)))
    assert results == [first] * 64 and compile_template.cache_info().misses == misses


# --- /tokenize of a chat: exactly apply_chat_template's ids (one BOS, never two) ---------------------------

CALL = {"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": "3é"}'}}
TOOL_TURNS = [{"role": "user", "content": "Sum 2 and 3"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": CALL["id"], "name": "add", "content": "5"}]


@pytest.fixture(scope="module")
def bos_serving(tmp_path_factory):
    """Serving over the demo checkpoint whose tokenizer.json puts BOS first, as DeepSeek's and Mixtral's do."""
    from deployments.api.serving import Serving
    from deployments.config import app_config
    from tests.deployments.helpers import NoRouters

    root = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(DEMO_TOKENIZER.parent, root)
    spec = json.loads((root / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    (root / "tokenizer.json").write_text(json.dumps(spec))
    return root, Serving(app_config({"model": str(root)}), NoRouters())


@pytest.mark.parametrize("family", sorted(BY_FAMILY))
@pytest.mark.parametrize("turns", ["plain", "tools"])
def test_tokenize_chat_equals_apply_chat_template_ids(bos_serving, tmp_path, family, turns):
    from deployments.api.schema import TokenizeRequest

    root, serving = bos_serving
    _, serving.templates = checkpoint(tmp_path, BY_FAMILY[family])
    shutil.copy(root / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    messages = CONVERSATION if turns == "plain" else TOOL_TURNS
    reference_messages = messages if turns == "plain" else [
        TOOL_TURNS[0], {**TOOL_TURNS[1], "content": "", "tool_calls": [
            {**CALL, "function": {"name": "add", "arguments": {"a": 2, "b": "3é"}}}]}, TOOL_TURNS[2]]
    want = tok.apply_chat_template(reference_messages, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)
    got = serving.tokenize(TokenizeRequest(messages=messages, tools=TOOLS))
    assert got == want
    assert tok.encode("x")[0] == 0  # the tokenizer does add BOS to plain text ...
    assert got[:2] != [0, 0] and (got[0] == 0) == (family in WRITES_BOS)  # ... but a chat has the template's only
