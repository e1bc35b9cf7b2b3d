"""Chat templates shaped like each family's released one, in the parts the server depends on: whether
the template writes bos_token, the turn markers, and how an assistant tool call is rendered (byte for
byte as the released template writes it, so a parser tested on their output reads what a model trained
on that template emits). Shortened elsewhere (system-prompt plumbing, tool-output turns).
"""
from __future__ import annotations

# DeepSeek-V2-Lite-Chat: writes bos_token itself; "User: ...\n\nAssistant:".
DEEPSEEK_V2_LITE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# DeepSeek-V3 / R1: bos_token, <｜User｜>/<｜Assistant｜>, calls as "function<｜tool▁sep｜>name\n```json ...```";
# R1 opens the answer with "<think>\n".
_DEEPSEEK_CALLS = (
    "{% for tool in message['tool_calls'] %}"
    "{% if loop.first %}{{ '<｜tool▁calls▁begin｜>' }}{% else %}{{ '\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n```json\n'"
    " + (tool['function']['arguments'] if tool['function']['arguments'] is string"
    " else tool['function']['arguments'] | tojson) + '\n```<｜tool▁call▁end｜>' }}{% endfor %}"
    "{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
)


def _deepseek(generation_prompt: str, calls: str = _DEEPSEEK_CALLS) -> str:
    return (
        "{% set ns = namespace(system_prompt='') %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
        "{{ bos_token }}{{ ns.system_prompt }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
        "{% if message['tool_calls'] is defined and message['tool_calls'] %}{{ message['content'] or '' }}" + calls +
        "{% else %}{{ message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
        "{% elif message['role'] == 'tool' %}"
        "{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜><｜tool▁outputs▁end｜>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + generation_prompt + "{% endif %}"
    )


DEEPSEEK_V3 = _deepseek("{{ '<｜Assistant｜>' }}")
DEEPSEEK_R1 = _deepseek("{{ '<｜Assistant｜><think>\\n' }}")
# V3.1: calls as "name<｜tool▁sep｜>{json}"; thinking is chosen by the prompt's "<think>" / "</think>".
DEEPSEEK_V31 = _deepseek(
    "{{ '<｜Assistant｜>' }}{% if thinking is defined and thinking %}{{ '<think>' }}{% else %}{{ '</think>' }}{% endif %}",
    calls=("{% for tool in message['tool_calls'] %}{% if loop.first %}{{ '<｜tool▁calls▁begin｜>' }}{% endif %}"
           "{{ '<｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + "
           "(tool['function']['arguments'] if tool['function']['arguments'] is string "
           "else tool['function']['arguments'] | tojson) + '<｜tool▁call▁end｜>' }}{% endfor %}"
           "{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"),
)

# Qwen2.5 / Qwen3 (Hermes style): no bos; <|im_start|>; calls as <tool_call>\n{json}\n</tool_call>;
# Qwen3 puts "<think>\n\n</think>\n\n" after the generation prompt when enable_thinking is false.
QWEN3 = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n\n<tools>' }}{% for tool in tools %}{{ '\n' + (tool | tojson) }}"
    "{% endfor %}{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}{{ '<|im_start|>assistant\n' + (message.content or '') }}"
    "{% for tool_call in message.tool_calls or [] %}{% if (loop.first and message.content) or not loop.first %}"
    "{{ '\n' }}{% endif %}{% set tool_call = tool_call.function %}"
    "{{ '<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{% if tool_call.arguments is string %}{{ tool_call.arguments }}{% else %}{{ tool_call.arguments | tojson }}"
    "{% endif %}{{ '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message.role == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + message.content + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

# Qwen3-Coder: <tool_call><function=name><parameter=key>value</parameter>... (strings raw, others JSON).
QWEN3_CODER = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}{{ '<|im_start|>assistant\n' + (message.content or '') }}"
    "{% for tool_call in message.tool_calls or [] %}{% set tool_call = tool_call.function %}"
    "{{ '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}"
    "{% for args_name, args_value in tool_call.arguments | items %}{{ '<parameter=' + args_name + '>\n' }}"
    "{% set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and "
    "args_value is not string) else args_value | string %}{{ args_value }}{{ '\n</parameter>\n' }}{% endfor %}"
    "{{ '</function>\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GLM-4.5: "[gMASK]<sop>" (no bos_token); calls as <tool_call>name\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>;
# the answer opens with "<think>" unless enable_thinking is false ("<think></think>").
GLM45 = (
    "[gMASK]<sop>{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ '<|assistant|>\n' + (m.content or '') }}"
    "{% for tc in m.tool_calls or [] %}{% set tc = tc.function %}{{ '\n<tool_call>' + tc.name + '\n' }}"
    "{% for k, v in tc.arguments | items %}{{ '<arg_key>' + k + '</arg_key>\n<arg_value>' }}"
    "{{ v | tojson(ensure_ascii=False) if v is not string else v }}{{ '</arg_value>\n' }}{% endfor %}"
    "{{ '</tool_call>' }}{% endfor %}"
    "{% elif m.role == 'tool' %}{{ '<|observation|>\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{% else %}{{ '<|' + m.role + '|>\n' + m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '\n<think></think>' }}{% endif %}{% endif %}"
)

# Kimi-K2: no bos; calls as <|tool_call_begin|>functions.name:index<|tool_call_argument_begin|>{json}.
KIMI_K2 = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}{{ '<|im_assistant|>assistant<|im_middle|>' + (message.content or '') }}"
    "{% if message.tool_calls %}{{ '<|tool_calls_section_begin|>' }}{% for tool_call in message.tool_calls %}"
    "{{ '<|tool_call_begin|>' + tool_call.id + '<|tool_call_argument_begin|>' }}"
    "{% set args = tool_call.function.arguments %}{{ args if args is string else args | tojson }}"
    "{{ '<|tool_call_end|>' }}{% endfor %}{{ '<|tool_calls_section_end|>' }}{% endif %}{{ '<|im_end|>' }}"
    "{% else %}{{ '<|im_' + message.role + '|>' + message.role + '<|im_middle|>' + message.content + '<|im_end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_assistant|>assistant<|im_middle|>' }}{% endif %}"
)

# Mistral / Mixtral (v3 tokenizer): bos_token, [INST] ... [/INST]; calls as [TOOL_CALLS][{json}, ...].
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}{{ '[INST] ' + message.content + '[/INST]' }}"
    "{% elif message.role == 'assistant' and message.tool_calls %}{{ '[TOOL_CALLS][' }}"
    "{% for tc in message.tool_calls %}{{ {'name': tc.function.name, 'arguments': tc.function.arguments} | tojson }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ ']' + eos_token }}"
    "{% elif message.role == 'assistant' %}{{ message.content + eos_token }}"
    "{% elif message.role == 'tool' %}{{ '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}"
    "{% endif %}{% endfor %}"
)

# gpt-oss (harmony): no bos; the reasoning effort a variable (default medium); analysis (reasoning) and final
# channels; calls on the commentary channel.
GPT_OSS = (
    "{% if reasoning_effort is not defined %}{% set reasoning_effort = 'medium' %}{% endif %}"
    "{{ '<|start|>system<|message|>Reasoning: ' + reasoning_effort + '<|end|>' }}{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "{% if m.thinking %}{{ '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' }}{% endif %}"
    "{% for tc in m.tool_calls or [] %}{{ '<|start|>assistant<|channel|>commentary to=functions.' + tc.function.name"
    " + ' <|constrain|>json<|message|>' + (tc.function.arguments | tojson) + '<|call|>' }}{% endfor %}"
    "{% if m.content %}{{ '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' }}{% endif %}"
    "{% elif m.role == 'tool' %}{{ '<|start|>functions.' + m.name + ' to=assistant<|channel|>commentary<|message|>'"
    " + m.content + '<|end|>' }}"
    "{% else %}{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

BY_FAMILY = {
    "deepseek_v2_lite": DEEPSEEK_V2_LITE, "deepseek_v3": DEEPSEEK_V3, "deepseek_r1": DEEPSEEK_R1,
    "deepseek_v31": DEEPSEEK_V31, "qwen3": QWEN3, "qwen3_coder": QWEN3_CODER, "glm45": GLM45,
    "kimi_k2": KIMI_K2, "mistral": MISTRAL, "gpt_oss": GPT_OSS,
}
# The ones that write bos_token themselves: the server must not add another.
WRITES_BOS = {"deepseek_v2_lite", "deepseek_v3", "deepseek_r1", "deepseek_v31", "mistral"}
