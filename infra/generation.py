"""What passes between sample.py's Generator and the programs that use it (the chat, a file of
prompts, the OpenAI endpoint of infra/server.py): a Request (a prompt, its sampling settings and
callbacks, and its row of the KV cache while it is decoded), the Completion it ends with, and its
text as it streams, held back where a stop sequence may begin.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

import data


@dataclass
class Completion:
    """A finished answer: its tokens (without the end of turn), its text, why it ended."""
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (end of turn) or "length"
    prompt_tokens: int


@dataclass(eq=False)
class Request:
    """One prompt being answered in a row of the KV cache, beside whatever else is decoded, with
    its own sampling settings, seed and budget."""
    prompt: list[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()  # texts that end the answer where they appear (not shown)
    on_token: Callable[[int], None] | None = None  # each new token, as it comes
    on_done: Callable[[Completion | Exception], None] | None = None  # the outcome, once
    cancelled: bool = False  # set by another thread (its client is gone): the row is freed
    # Set by the generator as it decodes:
    row: int = -1
    budget: int = 0
    tokens: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    completion: Completion | None = None


def until_stop(text: str, stops) -> tuple[int, bool]:
    """Returns how much of text may be shown, and whether a stop sequence ended it: the text before
    the first stop sequence in it; with none, all but a tail that may be the start of one."""
    found = [text.find(s) for s in stops if s in text]
    if found:
        return min(found), True
    tail = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - tail, False


class TextStream:
    """The on_token of one reply: decodes the tokens so far and hands on the new text, whole
    characters only (SentencePiece pieces can end inside a character or carry its leading space),
    none of a stop sequence or of what may become one, and spaces only once text follows them."""

    def __init__(self, tokenizer: data.Tokenizer, emit, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.emit = emit
        self.stop = stop
        self.tokens = []
        self.sent = ""

    def __call__(self, _row, token):
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens).lstrip()
        text = text[:until_stop(text, self.stop)[0]].rstrip()  # as the whole answer is
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):
            self.emit(text[len(self.sent):])
            self.sent = text
