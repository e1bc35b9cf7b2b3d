"""The API key a client presents: `Authorization: Bearer KEY` over HTTP and gRPC (or gRPC's
`x-api-key: KEY`), checked in constant time."""
from __future__ import annotations

import hmac


def bearer_key(authorization: str) -> str:
    """The key of an `Authorization` value ("" if it is not a bearer one). The scheme's name is
    case-insensitive (RFC 9110 section 11.1): `bearer KEY` was refused."""
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def key_matches(presented: str, key: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8", "replace"), key.encode())
