"""The sandbox chat templates run in: jinja2 set up the way transformers 5.23 sets it up, so a
checkpoint's template renders here exactly as `tokenizer.apply_chat_template(..., tokenize=False)`
renders it.

What transformers configures (transformers/utils/chat_template_utils.py) and we mirror:
- `ImmutableSandboxedEnvironment`: templates come with checkpoints and are untrusted code; they may
  not reach Python internals (`__class__`, ...) nor mutate their inputs (`messages.append`).
- `trim_blocks` and `lstrip_blocks`: whitespace around `{% ... %}` tags, as every template expects.
- the `loopcontrols` extension (`{% break %}`, `{% continue %}`) and a `{% generation %}` tag
  (training-time assistant masks; for serving it renders its body unchanged).
- a `tojson` filter without HTML escaping and with `ensure_ascii=False` (jinja's own escapes `<>&'`).
- globals `raise_exception(message)`, `strftime_now(format)`, a `dict()` that hands out dicts but not
  the `dict` type, and a `namespace()` that refuses underscore-prefixed names.

Compiled templates are cached by their source: compiling costs milliseconds, rendering microseconds.
Every failure becomes a `ChatTemplateError`; no jinja (or any other) exception leaves this module.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_MESSAGE_CHARS = 1000  # error bodies stay small even when a template quotes a huge input back


class ChatTemplateError(ValueError):
    """Any failure to find or render a chat template: a bad request or a bad checkpoint, never a crash.

    `message` is safe to return to the client (no traceback, no file path, bounded length).
    """

    def __init__(self, message: str):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.message = message


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers tracks where the body lands to build an
    assistant-token mask for training. Serving needs no mask, so the body renders as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block like transformers' own, so `set` inside the tag is scoped the same way there and here.
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    # The template's own words (e.g. "roles must alternate user/assistant") are the client's error message.
    raise ChatTemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictMaker:
    """`dict(a=1)` and `dict.fromkeys(keys)` for templates. Exposing the `dict` type itself would hand
    them a class object, whose attributes lead back to the interpreter."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace()`, minus underscore-prefixed names: `ns.__x__` must never reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 (jinja's signature: `self` may be a kwarg name)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_DictMaker(), namespace=_Namespace)
    return env


# One environment for all templates: it holds no per-template or per-request state, and jinja
# environments are safe to render from many threads at once.
_ENV = _environment()


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template for `source`, compiled once per process."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
    except Exception as e:  # noqa: BLE001 jinja lets Python's own compile errors through (`{% break %}` outside a loop)
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from None


def run_template(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render, turning whatever the template raises into a ChatTemplateError."""
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise  # raise_exception: the template's own message, unchanged
    except jinja2.TemplateError as e:  # undefined values, sandbox refusals
        raise ChatTemplateError(f"chat template error: {e.message or type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 a template is code: `1/0`, `'a' + 1`, runaway recursion ...
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None


@lru_cache(maxsize=64)
def reads_variables(source: str) -> frozenset[str]:
    """The variables the template reads from its caller (`reasoning_effort` in gpt-oss's, even where
    it sets a default for it first: `{% if reasoning_effort is not defined %}{% set ... %}`)."""
    compile_template(source)
    return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(source)))


@lru_cache(maxsize=64)
def loops_over_content(source: str) -> bool:
    """Whether the template iterates over a message's content (`{% for part in message.content %}`).

    Such a template takes content as a list of `{"type": "text", "text": ...}` parts, as transformers
    passes it; any other template takes one string. vLLM decides its content format the same way.
    """
    compile_template(source)  # a syntax error surfaces as ChatTemplateError, not from parse() below
    ast = _ENV.parse(source)
    aliases = {node.target.name for node in ast.find_all(jinja2.nodes.Assign)
               if isinstance(node.target, jinja2.nodes.Name) and _is_content(node.node)}
    return any(_is_content(loop.iter) or (isinstance(loop.iter, jinja2.nodes.Name) and loop.iter.name in aliases)
               for loop in ast.find_all(jinja2.nodes.For))


def _is_content(node: jinja2.nodes.Node | None) -> bool:
    """`x.content` or `x['content']`, possibly through filters (`message.content | selectattr(...)`)."""
    while isinstance(node, jinja2.nodes.Filter):
        node = node.node
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return False
