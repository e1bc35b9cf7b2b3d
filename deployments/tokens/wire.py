"""What the token stream looks like on the wire, shared by both ends.

One gRPC client-streaming call per (router, ingress replica), kept open; each message
is one engine step's outputs for that ingress: a pickled list of (request id,
[StepOutput, ...]). Pickle, as Serve's own handles use between the same processes;
the call is refused unless it carries the application's data-plane secret, so only
its routers can send.
"""
from __future__ import annotations

import pickle

METHOD = "/moe.TokenStream/Deliver"
SERVICE, NAME = "moe.TokenStream", "Deliver"
SECRET_KEY = "moe-token-stream-secret"
MAX_MESSAGE_BYTES = 256 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def encode(batch: list[tuple[str, list]]) -> bytes:
    return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


def decode(message: bytes) -> list[tuple[str, list]]:
    return pickle.loads(message)
