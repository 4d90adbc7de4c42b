"""Talk to a trained model: a chat in the terminal, one answer, a file of prompts, or an
OpenAI-compatible HTTP endpoint. Prompts are built by data.py's tokenize_conversation in inference
mode, the very template of training, at the checkpoint's inference condition (the expert's,
METHOD.md §1) unless told otherwise.

  python sample.py --checkpoint runs/demo/exports/epoch-5               # a chat
  python sample.py --checkpoint DIR --prompt "Sort these numbers from smallest to largest: 12 9 3"
  python sample.py --checkpoint DIR --input questions.jsonl --output answers.jsonl
  python sample.py --checkpoint DIR --serve --port 8000       # POST /v1/chat/completions

Read top to bottom: the Generator (a loaded export, a static KV cache whose rows hold the
requests being decoded together, each with its own sampling), then the four ways to use it; the
server decodes the requests that arrive together, a new one joining at the next step.
"""

import collections
import functools
import json
import math
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import torch

import data
from cli import Progress, arg, run_command
from files import check_output, read_json, write_atomically
from model import Transformer, default_device, default_dtype
from records import BadInput, Message, checked_utf8, read_records
from tokenizer_files import check_tokenizer_file


@dataclass
class SampleConfig:
    checkpoint: str = arg("", "an export folder written by train.py (config.json, safetensors, "
                              "crlft.json)")
    data: str = arg("", "with a base model as --checkpoint (no crlft.json): the dataset it is to "
                        "be fine-tuned on, whose tokenizer and template to prompt with")
    condition: str = arg("", "condition of the answers; empty: the checkpoint's inference one")
    system: str = arg("", "system prompt")
    temperature: float = arg(0.0, "sampling temperature; 0: greedy")
    top_p: float = arg(1.0, "nucleus sampling: keep the most likely tokens up to this mass")
    top_k: int = arg(0, "keep only the k most likely tokens (0: all)")
    max_new_tokens: int = arg(256, "longest answer in tokens")
    seed: int = arg(0, "seed of the sampling")
    prompt: str = arg("", "answer this one prompt and exit")
    input: str = arg("", "JSONL of prompts ({\"prompt\"} or {\"messages\"}, optional "
                         "\"condition\", \"system\")")
    output: str = arg("", "JSONL to write the answers to, with --input")
    overwrite: bool = arg(False, "replace --output if it exists")
    batch_size: int = arg(32, "prompts decoded together: of --input, or requests to --serve")
    serve: bool = arg(False, "serve the OpenAI chat completions API")
    max_waiting: int = arg(256, "with --serve: requests that may wait for a row while --batch-size "
                                "are decoded; beyond, the server answers 503")
    host: str = arg("127.0.0.1", "address to serve on")
    port: int = arg(8000, "port to serve on")
    device: str = arg("auto", "cuda or cpu; auto: cuda when there is one")
    compile: bool = arg(False, "compile the one-token decoding step (CUDA graphs on a GPU)")


# --------------------------------------------------------------------------------------------------
# The generator


@dataclass
class Completion:
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


class Generator:
    """A model with its tokenizer and inference condition, and a static KV cache whose rows hold the
    requests being decoded: new ones join (admit) while others decode (step), one token per row per
    step at that row's own position."""

    def __init__(self, model: Transformer, tokenizer: data.Tokenizer, inference_condition: str,
                 name: str, compile=False, conditions: list[str] | None = None):
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the model has {model.config.vocab_size} rows, the tokenizer "
                             f"{tokenizer.vocab_size} tokens")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.inference_condition = inference_condition
        self.conditions = conditions or [inference_condition]  # the ones the model was trained with
        self.device = next(model.parameters()).device
        self.cache_shape = (0, 0)
        self.rows: list[Request | None] = []  # the request in each row of the KV cache
        # gpt-fast's recipe: compile only the one-token step; "reduce-overhead" records it as a
        # CUDA graph.
        self.decode = model
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.decode = torch.compile(model, mode=mode, fullgraph=True)

    @classmethod
    def load(cls, checkpoint, device="auto", compile=False, dataset="") -> "Generator":
        """An export of train.py, or a base model (a Hugging Face folder with no crlft.json) before
        fine-tuning on `dataset`, prompted with that dataset's tokenizer and template, the
        template's new token rows at the mean of the others as train.py starts them. bf16 on a GPU,
        float32 on a CPU."""
        path = Path(checkpoint)
        if (path / "crlft.json").exists():
            meta = read_json(path / "crlft.json")
            tokenizer_file, expected = path / meta["tokenizer_file"], meta["tokenizer_sha256"]
            if dataset and data.load_meta(dataset)["tokenizer"]["sha256"] != expected:
                raise ValueError(f"{dataset} was made with another tokenizer than {path}'s: --data "
                                 f"is for a base model with no crlft.json; leave it out")
        elif dataset:
            meta = data.load_meta(dataset)
            tokenizer_file = Path(dataset) / meta["tokenizer"]["file"]
            expected = meta["tokenizer"]["sha256"]
        else:
            raise ValueError(f"{path} has no crlft.json: give an export of train.py, or a base "
                             f"with --data")
        tokenizer = data.Tokenizer(tokenizer_file, meta["template"])
        check_tokenizer_file(tokenizer.path, expected, "the model was trained with")
        device = default_device() if device == "auto" else torch.device(device)
        model = Transformer.from_pretrained(path, device=device, dtype=default_dtype(device))
        if model.config.vocab_size == tokenizer.base_vocab_size < tokenizer.vocab_size:
            model.extend_vocab(tokenizer.vocab_size)
        return cls(model, tokenizer, meta["inference_condition"], path.resolve().name, compile,
                   meta["conditions"])

    def prompt_ids(self, messages: list[Message], condition: str | None = None,
                   system: str | None = None):
        """The ids the model answers from: the training template up to the assistant prefix. A
        condition the model never saw in training would prompt it with nonsense: refused."""
        condition = self.inference_condition if condition is None else condition
        if condition not in self.conditions:
            raise ValueError(f"unknown condition {condition!r}: the model was trained with "
                             f"{', '.join(map(repr, self.conditions))}")
        for text in [system or "", *(m.text for m in messages)]:
            checked_utf8(text, "the prompt", "a message or the system prompt")  # a lone surrogate
        ids, _ = data.tokenize_conversation(self.tokenizer, messages, condition, system or None,
                                            inference=True)
        return ids

    def ensure_cache(self, batch_size: int, length: int):
        """A cache at least this large; kept while it is, so that compiled steps see the same
        buffers, and grown in a few sizes only (powers of two, at least 256 positions, at most the
        context), so that a compiled step meets few shapes and does not recompile for each longer
        prompt. The rows being decoded keep their keys and values when it grows."""
        if batch_size <= self.cache_shape[0] and length <= self.cache_shape[1]:
            return
        old = [layer.self_attn.kv_cache for layer in self.model.layers]
        rows = max(bucket(batch_size, 1), self.cache_shape[0])
        positions = min(bucket(length, 256), self.model.config.max_seq_len)
        self.cache_shape = (rows, max(positions, self.cache_shape[1]))
        self.model.setup_kv_cache(*self.cache_shape)
        for layer, cache in zip(self.model.layers, old):
            if cache is not None and any(self.rows):
                held_rows, held_positions = cache.k.shape[:2]
                layer.self_attn.kv_cache.k[:held_rows, :held_positions] = cache.k
                layer.self_attn.kv_cache.v[:held_rows, :held_positions] = cache.v

    def running(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens=256, temperature=0.0, top_p=1.0,
                 top_k=0, seed=0, on_token=None) -> list[Completion]:
        """Decodes the prompts together, each with the same settings; on_token(row, token) is
        called as tokens come. Each prompt draws from its own generator seeded with `seed`, so its
        answer does not depend on the prompts beside it."""
        requests = [Request(p, max_new_tokens, temperature, top_p, top_k, seed,
                            on_token=on_token and functools.partial(on_token, row))
                    for row, p in enumerate(prompts)]
        try:
            self.admit(requests)
            while self.running():
                self.step()
        finally:
            self.release(requests)  # after a failure midway too: the rows are free again
        return [r.completion for r in requests]

    @torch.no_grad()
    def admit(self, requests: list[Request]):
        """Prefills the requests into free rows of the KV cache, one forward of the right-padded
        batch with the output head only at each prompt's last token, and samples their first
        tokens. The padding's cache slots are overwritten by the decoding steps before any query
        can see them; the rows being decoded are not touched."""
        max_len = self.model.config.max_seq_len
        longest = max(len(r.prompt) for r in requests)
        if longest >= max_len:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the context of "
                             f"{max_len}")
        free = [row for row, r in enumerate(self.rows) if r is None]
        free += range(len(self.rows), len(self.rows) + len(requests) - len(free))
        for r, row in zip(requests, free):
            r.row = row
            r.budget = min(r.max_new_tokens, max_len - len(r.prompt))
            r.rng = torch.Generator(self.device).manual_seed(r.seed)
        self.rows += [None] * (max(r.row for r in requests) + 1 - len(self.rows))
        self.ensure_cache(len(self.rows), max(len(r.prompt) + r.budget
                                               for r in requests + self.running()))
        for r in requests:
            self.rows[r.row] = r
        rows = torch.tensor([r.row for r in requests], device=self.device)
        hidden = self.model.hidden_states(right_padded([r.prompt for r in requests], self.device),
                                          cache_rows=rows)
        last = torch.tensor([len(r.prompt) - 1 for r in requests], device=self.device)
        self.take(requests, self.model.logits(hidden[torch.arange(len(requests)), last]))

    @torch.no_grad()
    def step(self):
        """One token for every running request: each row's last token fed at its position. The
        batch is the rows up to the last one running (in a few sizes, for a compiled step); a free
        row among them decodes alongside, into its first cache slot, its output unused."""
        for r in self.running():
            if r.cancelled:
                self.rows[r.row] = None
        running = self.running()
        if not running:
            return
        size = bucket(max(r.row for r in running) + 1, 1)
        tokens = torch.zeros(size, 1, dtype=torch.long)
        positions = torch.zeros(size, 1, dtype=torch.long)
        for r in running:
            # The newest token, not yet fed, goes after the prompt and the tokens before it.
            tokens[r.row], positions[r.row] = r.tokens[-1], len(r.prompt) + len(r.tokens) - 1
        logits = self.decode(tokens.to(self.device), positions=positions.to(self.device))[:, 0]
        self.take(running, logits[torch.tensor([r.row for r in running], device=self.device)])

    def take(self, requests: list[Request], logits: torch.Tensor):
        """Each request's next token from its row of logits [B, V]: kept and handed on, or the end
        of its answer (the end of turn, one of its stop sequences, its budget spent)."""
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(requests) if r.temperature > 0]
        if sampled:  # each draws from its own generator
            tokens[sampled] = torch.cat([sample(logits[i:i + 1], requests[i].temperature,
                                                requests[i].top_p, requests[i].top_k,
                                                requests[i].rng) for i in sampled])
        for r, token in zip(requests, tokens.tolist()):  # one wait for the device
            if token == self.tokenizer.eot_id:
                self.finish(r, self.tokenizer.decode(r.tokens), "stop")
                continue
            r.tokens.append(token)
            if r.on_token:
                r.on_token(token)
            if r.stop:
                text = self.tokenizer.decode(r.tokens)
                end, stopped = until_stop(text, r.stop)
                if stopped:
                    self.finish(r, text[:end], "stop")
                    continue
            if len(r.tokens) >= r.budget:
                self.finish(r, self.tokenizer.decode(r.tokens), "length")

    def finish(self, r: Request, text: str, reason: str):
        """The answer whole (its text without the stop sequence), and its row freed."""
        r.completion = Completion(r.tokens, text.strip(), reason, len(r.prompt))
        self.rows[r.row] = None
        if r.on_done:
            r.on_done(r.completion)

    def release(self, requests: list[Request]):
        """Frees the rows of these requests (a failure midway leaves them unfinished)."""
        for r in requests:
            if 0 <= r.row < len(self.rows) and self.rows[r.row] is r:
                self.rows[r.row] = None


def until_stop(text: str, stops) -> tuple[int, bool]:
    """(how much of text may be shown, whether a stop sequence ended it): the text before the
    first stop sequence in it; with none, all but a tail that may be the start of one."""
    found = [text.find(s) for s in stops if s in text]
    if found:
        return min(found), True
    tail = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - tail, False


def bucket(n: int, smallest: int) -> int:
    """The first of smallest, 2·smallest, 4·smallest, … that holds n."""
    size = smallest
    while size < n:
        size *= 2
    return size


def right_padded(sequences: list[list[int]], device) -> torch.Tensor:
    """The token ids as one [B, longest] batch, each row a sequence followed by zeros."""
    batch = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    for row, s in enumerate(sequences):
        batch[row, :len(s)] = torch.tensor(s)
    return batch.to(device)


def sample(logits, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """The next token of each row from its logits [B, V]: argmax at temperature 0, otherwise a draw
    from the tempered distribution cut to the top_k tokens and to the top_p probability mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Chat, one prompt, a file of prompts


def chat(gen: Generator, cfg: SampleConfig):
    condition = cfg.condition or gen.inference_condition
    print(f"{gen.name}, condition {condition!r}. An empty line or Ctrl-D ends; /reset forgets the "
          f"conversation.")
    history = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append(Message("user", line))
        history, prompt = fit_history(gen, history, condition, cfg)
        if prompt is None:
            print("(that message alone is longer than the model's context: not sent)")
            continue
        print("model> ", end="", flush=True)
        stream = TextStream(gen.tokenizer, lambda text: print(text, end="", flush=True))
        [reply] = generate_for(gen, cfg, [prompt], on_token=stream)
        print()
        history.append(Message("assistant", reply.text))


def fit_history(gen: Generator, history: list[Message], condition: str, cfg: SampleConfig):
    """(history, prompt ids), the oldest exchanges dropped, and said so, until the prompt leaves
    room for an answer (--max-new-tokens, or half the context if that is less); (history without
    its last message, None) when the last message alone does not fit."""
    context = gen.model.config.max_seq_len
    prompt = gen.prompt_ids(history, condition, cfg.system)
    dropped = 0
    while len(prompt) + min(cfg.max_new_tokens, context // 2) > context and len(history) > 1:
        history = history[2:]
        dropped += 1
        prompt = gen.prompt_ids(history, condition, cfg.system)
    if dropped:
        print(f"(the conversation outgrew the model's context of {context} tokens: its {dropped} "
              f"oldest exchange{'s' if dropped > 1 else ''} forgotten)")
    if len(prompt) >= context:
        return history[:-1], None
    return history, prompt


class TextStream:
    """on_token for one reply: decodes the tokens so far and hands on the new text, whole
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


def generate_for(gen: Generator, cfg: SampleConfig, prompts, on_token=None):
    return gen.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                        cfg.seed, on_token)


def read_prompts(path: Path):
    """(record, messages, system) of each record {"prompt": str} or {"messages": [{"role",
    "content"}]}, with optional "condition" and "system" strings; a bad one names its file and
    line."""
    items = []
    for item, where in read_records(path):
        if isinstance(item, BadInput):
            raise item
        try:
            items.append((item, *prompt_record(item)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return items


def prompt_record(item) -> tuple[list[Message], str | None]:
    """(messages, system) of one record of a prompts file, or ValueError saying what is wrong."""
    if not isinstance(item, dict):
        raise ValueError(f"a record is a JSON object, not {type(item).__name__}")
    for key in ("prompt", "condition", "system"):
        if key in item and not isinstance(item[key], str):
            raise ValueError(f"'{key}' is {type(item[key]).__name__}, not a string")
    if "messages" in item:
        return parse_messages(item["messages"])
    if "prompt" not in item:
        raise ValueError("the record has neither 'prompt' nor 'messages'")
    return [Message("user", item["prompt"])], None


def batch_file(gen: Generator, cfg: SampleConfig, items: list):
    """The answers to a file of prompts, written whole at the end; if generation fails or is
    interrupted midway, the answers finished so far are written, and said so."""
    results = []
    progress = Progress("prompts", len(items))
    try:
        for i in range(0, len(items), cfg.batch_size):
            chunk = items[i:i + cfg.batch_size]
            prompts = [gen.prompt_ids(messages, item.get("condition", cfg.condition or None),
                                      item.get("system", system))
                       for item, messages, system in chunk]
            for (item, _, _), done in zip(chunk, generate_for(gen, cfg, prompts)):
                results.append({**item, "answer": done.text, "finish_reason": done.finish_reason})
            progress.update(len(chunk))
    finally:
        text = "".join(json.dumps(r) + "\n" for r in results)
        write_atomically(Path(cfg.output), lambda tmp: tmp.write_text(text))
        if len(results) < len(items):
            print(f"wrote the {len(results)} answers finished, of {len(items)} prompts, to "
                  f"{cfg.output}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# The OpenAI-compatible endpoint


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def parse_messages(messages) -> tuple[list[Message], str | None]:
    """OpenAI chat messages → (user and assistant turns ending with a user turn, system prompt)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")):
            raise RequestError(f"messages[{i}] needs a role (system, user, assistant) and a string "
                               f"content", "messages")
        if m["role"] == "system":
            if i:
                raise RequestError("a system message must come first", "messages")
            system = m["content"]
        else:
            turns.append(Message(m["role"], m["content"]))
    if not turns or turns[-1].role != "user":
        raise RequestError("the last message must be the user's", "messages")
    return turns, system


REQUEST_FIELDS = {"model": str, "messages": list, "max_tokens": int, "max_completion_tokens": int,
                  "temperature": (int, float), "top_p": (int, float), "top_k": int, "seed": int,
                  "stream": bool, "stream_options": dict, "stop": (str, list), "condition": str,
                  "n": int}


def check_request(body, gen: Generator) -> dict:
    """The generation settings of a chat completion request, or RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, kind in REQUEST_FIELDS.items():
        value = body.get(key)
        wrong_bool = isinstance(value, bool) and kind is not bool
        if value is not None and (not isinstance(value, kind) or wrong_bool):
            raise RequestError(f"'{key}' has the wrong type", key)
    messages, system = parse_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if max_tokens <= 0:
        raise RequestError("'max_tokens' must be positive", "max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    temperature = body.get("temperature", 0)
    top_p = body.get("top_p", 1)
    top_k = body.get("top_k", 0)
    if not (0 <= temperature < math.inf and 0 < top_p <= 1 and top_k >= 0):  # NaN fails them all
        raise RequestError("temperature must be finite and >= 0, top_p in (0, 1], top_k >= 0")
    if not 0 <= body.get("seed", 0) < 2**63:
        raise RequestError("'seed' must be in [0, 2**63)", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(t, str) and t for t in stop):
        raise RequestError("'stop' is a string or a list of at most 4 non-empty strings", "stop")
    usage = (body.get("stream_options") or {}).get("include_usage", False)
    if not isinstance(usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options")
    try:
        prompt = gen.prompt_ids(messages, body.get("condition"), system)
    except BadInput as e:  # a lone surrogate in a message
        raise RequestError(str(e), "messages") from None
    except ValueError as e:  # a condition the model was not trained with
        raise RequestError(str(e), "condition") from None
    if len(prompt) >= gen.model.config.max_seq_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens; the context holds "
                           f"{gen.model.config.max_seq_len}", "messages")
    return dict(prompt=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k, seed=body.get("seed", 0), stop=tuple(stop),
                stream=body.get("stream", False), stream_usage=usage)


MAX_BODY = 4 * 2**20  # bytes: a chat request is far smaller; a larger one is refused unread


class Handler(BaseHTTPRequestHandler):
    """Every request gets an HTTP answer with a JSON body (a stream: an error event and [DONE]),
    whatever is wrong with it, and the server goes on serving. make_server binds a Generator and
    the Scheduler that runs it."""
    gen: Generator
    scheduler: "Scheduler"
    protocol_version = "HTTP/1.1"
    # A garbled request line gets a status line too (HTTP/0.9 has none).
    default_request_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may stay silent: an idle client does not hold a thread
    routes = {"/v1/models": "GET", "/v1/chat/completions": "POST"}

    def route(self):
        path = self.path.split("?")[0].rstrip("/")
        if path not in self.routes:
            return self.send_json(404, error_body(f"no route {self.path}", "not_found_error"))
        if self.command != self.routes[path]:
            return self.send_json(
                405, error_body(f"{path} takes {self.routes[path]}, not {self.command}"),
                {"Allow": self.routes[path]})
        self.answered = False
        try:
            self.list_models() if path == "/v1/models" else self.chat_completion()
        except RequestError as e:
            if e.status == 503:  # the server is full: the client may try again
                return self.send_json(503, error_body(str(e), "server_error"), {"Retry-After": "1"})
            self.send_json(e.status, error_body(str(e), param=e.param))
        except Exception as e:  # a fault of ours: said, logged, and the server goes on
            self.log_error("%s failed: %r", path, e)
            if not self.answered:
                self.send_json(500, error_body(f"server error: {e}", "server_error"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def list_models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": self.gen.name, "object": "model", "created": 0, "owned_by": "crlft"}]})

    def chat_completion(self):
        request = check_request(self.read_json_body(), self.gen)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        settings = {k: request[k]
                    for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")}
        if request["stream"]:
            return self.stream(request["prompt"], settings, reply_id, created,
                               request["stream_usage"])
        outcome = queue.SimpleQueue()
        self.scheduler.submit(Request(request["prompt"], **settings, on_done=outcome.put))
        done = outcome.get()
        if isinstance(done, Exception):
            raise done
        self.send_json(200, {
            "id": reply_id, "object": "chat.completion", "created": created, "model": self.gen.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason}],
            "usage": usage_of(done)})

    def read_json_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a JSON body with its Content-Length is required", status=411)
        if not re.fullmatch(r"[0-9]+", length):
            raise RequestError(f"Content-Length {length!r} is not a number of bytes")
        if int(length) > MAX_BODY:
            raise RequestError(f"the body is {int(length):,} bytes; at most {MAX_BODY:,}",
                               status=413)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {self.timeout} s",
                               status=408) from None
        try:
            return json.loads(raw)  # bytes: invalid UTF-8 raises too
        except (ValueError, RecursionError) as e:
            raise RequestError(f"malformed JSON: {str(e) or 'nested too deeply'}") from None

    def stream(self, prompt, settings, reply_id, created, usage: bool):
        """Server-sent events: a role chunk, content chunks as tokens come, a finish chunk (with
        `usage`, stream_options.include_usage: then a chunk of the token counts), [DONE]; a
        generation that fails ends with an error event, then [DONE]. A client that goes away frees
        its row at the next decoding step."""
        events = queue.SimpleQueue()  # the tokens as they come, then the Completion or the error
        request = Request(prompt, **settings, on_token=events.put, on_done=events.put)
        self.scheduler.submit(request)  # refused (503) before any of the stream is sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.answered = True
        self.close_connection = True

        def send(payload: dict):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        head = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                "model": self.gen.name}

        def event(delta, finish_reason=None):
            send({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                  **({"usage": None} if usage else {})})

        try:
            event({"role": "assistant", "content": ""})
            streamed = TextStream(self.gen.tokenizer, lambda text: event({"content": text}),
                                  settings["stop"])
            while isinstance(item := events.get(), int):
                streamed(0, item)
            if isinstance(item, Exception):
                self.log_error("generation failed: %r", item)
                send(error_body(f"generation failed: {item}", "server_error"))
            else:
                if item.text != streamed.sent:  # the rest: a character cut short, a held-back tail
                    event({"content": item.text[len(streamed.sent):]})
                event({}, item.finish_reason)
                if usage:
                    send({**head, "choices": [], "usage": usage_of(item)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError as e:  # the client closed the connection, or stopped reading for `timeout`
            request.cancelled = True
            self.log_error("stream cut short (%r): its row is freed", e)

    def send_json(self, status: int, body: dict, headers: dict | None = None):
        payload = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.answered = True
        # After a refusal the body may be unread: the connection cannot carry another request.
        self.close_connection |= status >= 400

    def send_error(self, code, message=None, explain=None):
        """http.server's own answers (a bad request line, headers too long, HEAD), in JSON too."""
        self.send_json(code, error_body(message or HTTPStatus(code).phrase))

    def log_message(self, format, *args):
        print(f"{self.address_string()} {format % args}", file=sys.stderr)


def usage_of(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
            "total_tokens": done.prompt_tokens + len(done.tokens)}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


class Scheduler:
    """The one thread that runs the model for the server. Requests wait in a queue and join the
    running batch at the next decoding step, as rows free up: at most max_batch rows decode
    together, at most max_waiting requests wait (beyond, a 503). Only this thread runs the model:
    CUDA graphs recorded by --compile (reduce-overhead) belong to the thread that recorded them.
    A greedy answer is the one its prompt gets alone (tested on a CPU in float32); on a GPU a
    batch's matmuls may take other kernels than one row's, summing in another order, so in bf16 a
    near-tie between two tokens can break the other way."""

    def __init__(self, gen: Generator, max_batch: int, max_waiting: int):
        self.gen = gen
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.waiting = collections.deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, request: Request):
        with self.wakeup:
            if len(self.waiting) >= self.max_waiting:
                raise RequestError(f"the server is full ({self.max_batch} being answered, "
                                   f"{len(self.waiting)} waiting); try again shortly", status=503)
            self.waiting.append(request)
            self.wakeup.notify()

    def run(self):
        while True:
            with self.wakeup:
                while not (self.waiting or self.gen.running() or self.stopping):
                    self.wakeup.wait()
                if self.stopping:
                    break
                free = self.max_batch - len(self.gen.running())
                joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            self.decode([r for r in joining if not r.cancelled])
        self.fail([*self.waiting, *self.gen.running()], RuntimeError("the server stopped"))

    def decode(self, joining: list[Request]):
        """One step of the batch, the joining requests' prefill first. A failure fails every
        request in the batch (each is told), and the server goes on with the next."""
        try:
            if joining:
                self.gen.admit(joining)
            self.gen.step()
        except Exception as e:
            self.fail([*joining, *self.gen.running()], e)

    def fail(self, requests: list[Request], error: Exception):
        self.gen.release(requests)
        for r in dict.fromkeys(requests):
            r.on_done(error)

    def stop(self):
        """Ends the thread after the step it is in; the requests still there fail."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()


def make_server(gen: Generator, host: str, port: int, max_batch: int = 32,
                max_waiting: int = 256) -> ThreadingHTTPServer:
    """A thread per connection, and one Scheduler thread that decodes the requests together."""
    bound = type("Handler", (Handler,), {"gen": gen,
                                          "scheduler": Scheduler(gen, max_batch, max_waiting)})
    return Server((host, port), bound)


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog (socketserver's 5 makes a burst of clients wait)

    def server_close(self):
        super().server_close()
        self.RequestHandlerClass.scheduler.stop()


def check_config(cfg: SampleConfig):
    """Flags checked before anything is loaded; each mistake names its flag."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: an export folder written by train.py")
    if cfg.input and not cfg.output:
        raise ValueError("--input needs --output")
    for flag, ok in (("temperature", 0 <= cfg.temperature < math.inf),
                     ("top-p", 0 < cfg.top_p <= 1), ("top-k", cfg.top_k >= 0),
                     ("max-new-tokens", cfg.max_new_tokens > 0), ("batch-size", cfg.batch_size > 0),
                     ("max-waiting", cfg.max_waiting >= 0),
                     ("port", 0 <= cfg.port <= 65535)):
        if not ok:
            value = getattr(cfg, flag.replace("-", "_"))
            raise ValueError(f"--{flag}={value} is out of range (see --help)")


def run(cfg: SampleConfig):
    """The outputs and inputs checked first, then the model loaded and used one of four ways."""
    check_config(cfg)
    if cfg.output:
        check_output(Path(cfg.output), cfg.overwrite)
    items = read_prompts(Path(cfg.input)) if cfg.input else []
    gen = Generator.load(cfg.checkpoint, cfg.device, cfg.compile, cfg.data)
    gen.prompt_ids([], cfg.condition or None)  # an unknown --condition is refused first
    torch.manual_seed(cfg.seed)
    if cfg.serve:
        try:
            server = make_server(gen, cfg.host, cfg.port, cfg.batch_size, cfg.max_waiting)
        except (OSError, OverflowError) as e:  # a port in use or out of range, an unknown host
            raise OSError(f"cannot serve on {cfg.host}:{cfg.port}: {e}") from None
        print(f"serving {gen.name} on "
              f"http://{cfg.host}:{server.server_port}/v1/chat/completions", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    elif cfg.input:
        batch_file(gen, cfg, items)
    elif cfg.prompt:
        prompt = gen.prompt_ids([Message("user", cfg.prompt)], cfg.condition or None, cfg.system)
        [done] = generate_for(gen, cfg, [prompt])
        print(done.text)
    else:
        chat(gen, cfg)


if __name__ == "__main__":
    sys.exit(run_command(SampleConfig, run, sys.argv[1:], __doc__))
