"""A reasoning model's thinking split from its answer: `message.reasoning_content` apart from `content`.

Two shapes (parser names are vLLM's `--reasoning-parser` names):
- `<think>…</think>` before the answer: DeepSeek-R1 and V3.1, Qwen3, GLM-4.5 (`deepseek_r1`, `deepseek_v3`,
  `qwen3`, `glm45`, all read alike). Templates that open the block in the prompt (R1's "<think>\\n",
  V3.1 thinking) leave the reply starting inside it; with thinking off (Qwen3 `enable_thinking: false`,
  V3.1 non-thinking) the prompt closes the block and the reply is all answer.
- gpt-oss's harmony `analysis` channel (`gpt_oss`): read by the harmony parser (tool_parsers/openai.py).

Thinking cut off by max_tokens (no `</think>`) is all reasoning, with empty content (vLLM does the same).
A grammar (forced call, response_format) on a reply that starts inside a block waits for `</think>`:
serving.py puts its ids in GrammarSpec.reasoning_end, and the engine starts the matcher after them.
Newlines right inside the tags are dropped, as the templates drop them when they render a past turn.
"""
from __future__ import annotations

from deployments.api.markers import partial_marker

OPEN, CLOSE = "<think>", "</think>"
THINK, HARMONY = "think", "harmony"
PARSERS = {"deepseek_r1": THINK, "deepseek_v3": THINK, "qwen3": THINK, "glm45": THINK, "gpt_oss": HARMONY}


def detect(template: str) -> str | None:
    """The reasoning shape a chat template renders: harmony channels, `<think>` blocks, or none."""
    if "<|channel|>" in template:
        return HARMONY
    return THINK if OPEN in template else None


def opens_thinking(prompt_tail: str) -> bool:
    """Whether a prompt (its last characters) leaves a `<think>` block open for the reply."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


def split(text: str, opened: bool) -> tuple[str | None, str]:
    """(reasoning or None, content) of a finished reply."""
    stripped = text.lstrip()
    if stripped.startswith(OPEN):
        text, opened = stripped[len(OPEN):], True
    if not opened:
        return None, text
    reasoning, closed, content = text.partition(CLOSE)
    return reasoning.strip("\n"), content.lstrip("\n") if closed else ""


class ThinkStream:
    """`split` on a reply that arrives in pieces: each piece gives (reasoning delta, content delta). Text
    that may be the start of a tag, or newlines that may end the reasoning, wait for the next piece."""

    def __init__(self, opened: bool):
        self.state = "reasoning" if opened else "start"
        self.pending = ""
        self.at_start = True  # newlines at the start of the current part are dropped

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning = content = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if len(head) < len(OPEN) and OPEN.startswith(head):
                return "", ""  # may still become "<think>"
            if head.startswith(OPEN):
                self.pending, self.state = head[len(OPEN):], "reasoning"
            else:
                self.state, self.at_start = "content", False  # no thinking: the reply is content as it is
        if self.state == "reasoning":
            reasoning = self._reasoning()
        if self.state == "content":
            content, self.pending = self._lead(self.pending), ""
        return reasoning, content

    def _reasoning(self) -> str:
        at = self.pending.find(CLOSE)
        if at >= 0:
            out = self._lead(self.pending[:at].rstrip("\n"))
            self.pending, self.state, self.at_start = self.pending[at + len(CLOSE):], "content", True
            return out
        keep = partial_marker(self.pending, CLOSE)
        body = self.pending[:len(self.pending) - keep]
        ready = body.rstrip("\n")
        self.pending = body[len(ready):] + self.pending[len(body):]
        return self._lead(ready)

    def _lead(self, text: str) -> str:
        if self.at_start:
            text = text.lstrip("\n")
            self.at_start = not text
        return text

    def finish(self) -> tuple[str, str]:
        """What was held back, when the reply ends."""
        rest, self.pending = self.pending, ""
        if self.state == "reasoning":
            return self._lead(rest.rstrip("\n")), ""
        return "", self._lead(rest) if self.state == "content" else rest
