"""One rule for every user-facing model (API bodies, the policy): a value of another kind is refused,
not guessed at. Pydantic's lax mode took "yes" for true, true for 1 and "5" for 5; OpenAI answers 400.
A whole-number float stays accepted for an integer (YAML writes 8.0e9 so; JSON clients send 16.0)."""
from __future__ import annotations

from functools import cache
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, field_validator


class NoGuessing(BaseModel):
    """A model whose every field follows the rule (API bodies, the policy)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_guessing(cls, value: Any, info) -> Any:
        return refuse_guessed(cls, value, info.field_name)


def refuse_guessed(model: type, value: Any, field_name: str) -> Any:
    """`value` for `model`'s field, or ValueError."""
    kinds = _types(model.model_fields[field_name].annotation)
    if bool in kinds and value is not None and not isinstance(value, bool):
        raise ValueError("must be true or false")
    if bool not in kinds and isinstance(value, bool):
        raise ValueError("must not be true or false")
    if kinds & {int, float} and str not in kinds and isinstance(value, str):
        raise ValueError("must be a number, not text")
    return value


@cache  # every field of every request body: annotations are few and hashable
def _types(annotation) -> frozenset:
    """The types a field takes (each member of a union)."""
    if get_origin(annotation) in (Union, UnionType):
        return frozenset().union(*map(_types, get_args(annotation)))
    return frozenset({annotation})
