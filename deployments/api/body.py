"""Reading a JSON request body safely: size first, then JSON, then shape, then the model.

Every failure is an ApiError with an OpenAI body: 415 (not JSON content, or compressed), 413
(over the size limit, checked while reading, never after buffering it all), 400
(invalid JSON, nesting deeper than MAX_DEPTH, strings with lone surrogates,
not an object, a field the model refuses, named in `param`).
"""
from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from deployments.api.errors import ApiError

MAX_DEPTH = 32
M = TypeVar("M", bound=BaseModel)


async def read_bytes(request: Request, limit: int) -> bytes:
    if "application/json" not in request.headers.get("content-type", "").lower():
        raise ApiError(415, "Content-Type must be application/json")
    if request.headers.get("content-encoding", "").strip().lower() not in ("", "identity"):  # else "not valid JSON"
        raise ApiError(415, "Content-Encoding must be identity: send the body uncompressed")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_tree(value) -> None:
    """Depth and text checks without recursion (a hostile body must not exhaust the stack)."""
    stack = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"request body nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, str):
            _check_text(node, path)
        elif isinstance(node, dict):
            for key, child in node.items():
                _check_text(key, path)
                stack.append((child, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(node, list):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = path.split("[")[0].split(".")[0] or None
        raise ApiError(400, f"{path or 'body'}: invalid unicode (a lone surrogate)", param) from None


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"request body nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    _check_tree(body)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def validation_error(e: ValidationError) -> ApiError:
    """The first problem, naming the field (model-level checks name it in their message)."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        named = re.match(r"^([a-z_]+)[: ]", msg)
        return ApiError(400, msg, named.group(1) if named else None)
    return ApiError(400, f"{loc}: {msg}", loc.split(".")[0])


async def read_model(request: Request, model_cls: type[M], limit: int) -> M:
    body = parse_json(await read_bytes(request, limit))
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
