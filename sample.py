"""Talk to a trained model: a chat in the terminal, one answer, a file of prompts, or an
OpenAI-compatible HTTP endpoint. Prompts are built by data.py's tokenize_conversation in inference
mode, the very template of training, at the checkpoint's inference condition (the expert's,
METHOD.md §1) unless told otherwise.

  python sample.py --checkpoint runs/demo/exports/epoch-5               # a chat
  python sample.py --checkpoint DIR --prompt "Sort these numbers from smallest to largest: 12 9 3"
  python sample.py --checkpoint DIR --input questions.jsonl --output answers.jsonl
  python sample.py --checkpoint DIR --serve --port 8000       # POST /v1/chat/completions

Read top to bottom: the Generator (a loaded export, a static KV cache whose rows hold the
requests being decoded together, each with its own sampling: prefill, then one decode_step after
another), then the ways to use it: a chat, one prompt, a file of prompts. The endpoint of --serve
(infra/server.py) decodes the requests that arrive together, a new one joining at the next step.
"""

import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from infra.cli import Progress, arg, check_ranges, run_command
from infra.exports import load_for_inference
from infra.files import check_output, write_atomically
from infra.generation import Completion, Request, TextStream, until_stop
from infra.records import BadInput, Message, checked_utf8, read_records
from infra.server import make_server, parse_messages
from model import Transformer


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


class Generator:
    """A model with its tokenizer and inference condition, and a static KV cache whose rows hold the
    requests being decoded: new ones join (prefill) while others decode (decode_step), one token per
    row per step at that row's own position."""

    def __init__(self, model: Transformer, tokenizer: data.Tokenizer, inference_condition: str,
                 name: str, compile=False, conditions: list[str] | None = None):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model has {model.config.vocab_size} rows, fewer than the "
                             f"tokenizer's {tokenizer.vocab_size} tokens")
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
        """Loads an export of train.py, or a base before fine-tuning on `dataset` (prompted with its
        tokenizer and template): infra/exports.py's load_for_inference."""
        model, tokenizer, info = load_for_inference(checkpoint, device, dataset)
        return cls(model, tokenizer, info.inference_condition, Path(checkpoint).resolve().name,
                   compile, info.conditions)

    def prompt_ids(self, messages: list[Message], condition: str | None = None,
                   system: str | None = None):
        """Returns the ids the model answers from: the training template up to the assistant prefix.
        A condition the model never saw in training would prompt it with nonsense: refused."""
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
        """Makes a cache at least this large; kept while it is, so that compiled steps see the same
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
            self.prefill(requests)
            while self.running():
                self.decode_step()
        finally:
            self.release(requests)  # after a failure midway too: the rows are free again
        return [r.completion for r in requests]

    @torch.no_grad()
    def prefill(self, requests: list[Request]):
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
        last_logits = self.model.logits(hidden[torch.arange(len(requests)), last])
        self.append_next_tokens(requests, last_logits)

    @torch.no_grad()
    def decode_step(self):
        """Decodes one token for every running request: each row's last token fed at its position.
        The batch is the rows up to the last one running (in a few sizes, for a compiled step); a
        free row among them decodes alongside, into its first cache slot, its output unused."""
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
        rows = torch.tensor([r.row for r in running], device=self.device)
        self.append_next_tokens(running, logits[rows])

    def append_next_tokens(self, requests: list[Request], logits: torch.Tensor):
        """Picks each request's next token from its row of logits [B, V] and appends it, or ends its
        answer there (the end of turn, one of its stop sequences, its budget spent). Rows past the
        tokenizer's are padding, never a token (infra/hf.py's vocabulary_rows): never drawn."""
        logits = logits[:, :self.tokenizer.vocab_size]
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
        """Ends a request: its answer whole (its text without the stop sequence), its row freed."""
        r.completion = Completion(r.tokens, text.strip(), reason, len(r.prompt))
        self.rows[r.row] = None
        if r.on_done:
            r.on_done(r.completion)

    def release(self, requests: list[Request]):
        """Frees the rows of these requests (a failure midway leaves them unfinished)."""
        for r in requests:
            if 0 <= r.row < len(self.rows) and self.rows[r.row] is r:
                self.rows[r.row] = None


def bucket(n: int, smallest: int) -> int:
    """Returns the first of smallest, 2·smallest, 4·smallest, … that holds n."""
    size = smallest
    while size < n:
        size *= 2
    return size


def right_padded(sequences: list[list[int]], device) -> torch.Tensor:
    """Puts the token ids in one [B, longest] batch, each row a sequence followed by zeros."""
    batch = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    for row, s in enumerate(sequences):
        batch[row, :len(s)] = torch.tensor(s)
    return batch.to(device)


def sample(logits, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """Picks the next token of each row from its logits [B, V]: argmax at temperature 0, otherwise a
    draw from the tempered distribution cut to the top_k tokens and to the top_p probability mass.
    """
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
    """Returns (history, prompt ids), the oldest exchanges dropped (and said so) until the prompt
    leaves room for an answer (--max-new-tokens, or half the context if that is less); (history
    without its last message, None) when the last message alone does not fit."""
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


def generate_for(gen: Generator, cfg: SampleConfig, prompts, on_token=None):
    return gen.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                        cfg.seed, on_token)


def read_prompts(path: Path):
    """Reads a file of prompts: (record, messages, system) of each record {"prompt": str} or
    {"messages": [{"role", "content"}]}, with optional "condition" and "system" strings; a bad one
    names its file and line."""
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
    """Returns (messages, system) of one record of a prompts file, or ValueError saying what is
    wrong."""
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
    """Answers a file of prompts, written whole at the end; if generation fails or is interrupted
    midway, the answers finished so far are written, and said so."""
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


def check_config(cfg: SampleConfig):
    """Refuses flags no run can use, before anything is loaded; each mistake names its flag."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: an export folder written by train.py")
    if cfg.input and not cfg.output:
        raise ValueError("--input needs --output")
    check_ranges(cfg, {"temperature": 0 <= cfg.temperature < math.inf,
                       "top_p": 0 < cfg.top_p <= 1, "top_k": cfg.top_k >= 0,
                       "max_new_tokens": cfg.max_new_tokens > 0, "batch_size": cfg.batch_size > 0,
                       "max_waiting": cfg.max_waiting >= 0, "port": 0 <= cfg.port <= 65535})


def run(cfg: SampleConfig):
    """Checks the outputs and inputs first, then loads the model and uses it one of four ways."""
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
