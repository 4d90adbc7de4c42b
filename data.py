"""Mixed-quality conversations → conditioned, weighted token arrays: the data half of C-RLFT.

  python data.py prepare --source="GPT4:1.0:gpt4.json" --source="GPT3:0.1:gpt35.jsonl" \
                         --tokenizer=tokenizer.model --out=data/mine
  python data.py tokenizer --corpus=conversations.json --vocab-size=4096 --out=tokenizer.model
  python data.py show --data=data/demo/dataset --index=3   # what C-RLFT learns from one conversation

Read top to bottom:
  1. The template (METHOD.md §3): which tokens a conversation becomes and which of them carry weight; the
     tokenizers it runs on (a SentencePiece .model, or a tokenizer.json through the `tokenizers` library).
  2. Sources and their files: ShareGPT and OpenChat JSONL records, checked, bad input named by file and line.
  3. prepare: every conversation tokenised, weighted, shifted, and written as memory-mapped arrays.
  4. Multipack (METHOD.md §5): conversations into equal numbers of packed streams per rank, at train time.
  5. Training a SentencePiece tokenizer (the demo's task and data are in demo.py: `python demo.py`).
  6. show: a prepared conversation with the weight of every token the model learns.
Each source is a condition string and a class weight: the condition goes into every role prefix (the
policy is conditioned on the data's source, πθ(y | x, c)) and the weight scales the loss of its
assistant tokens (the reward-weighted likelihood of METHOD.md §1).
"""

import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import sentencepiece as spm

from cli import arg, parse
from files import replace_directory, write_atomically

# ---------------------------------------------------------------------------------------------------------
# 1. The conversation template (METHOD.md §3)

EOT = "<|end_of_turn|>"


@dataclass(frozen=True)
class Template:
    """OpenChat's templates: BOS, [system + EOT], then per turn a role prefix that carries the condition
    ("GPT4 User:"), the message text and EOT. The families differ in how a prefix is written, in their special
    tokens and in the condition used at inference."""
    eot: str | None  # the token ending every turn; None: no turns (the "text" template)
    special_tokens: tuple[str, ...]  # what the template writes as single ids: the tokenizer's own, or new rows
    inference_condition: str
    header: tuple[str, str] | None = None  # 3.6: the role between Llama-3's header tokens; the system is a role

    def role_prefix(self, role: str, condition: str) -> str:
        """The text before a message, special tokens spelt out: "GPT4 User:" (v3.2, 3.5) or
        "<|start_header_id|>GPT4 User<|end_header_id|>\n\n" (3.6); with no condition, "User:" (the
        ablations' "no condition" variant)."""
        name = f"{condition} {ROLE_NAMES[role]}".strip()
        return f"{self.header[0]}{name}{self.header[1]}" if self.header else f"{name}:"


TEMPLATES = {
    "openchat_v3.2": Template(EOT, (EOT,), "GPT4"),  # the paper's model (Llama-2-13B): GPT4 / GPT3 conditions
    "openchat_3.5": Template(EOT, (EOT, "<|pad_0|>"), "GPT4 Correct"),  # Mistral-7B
    # OpenChat 3.6 (Llama-3-8B): Llama-3's own header and end-of-turn tokens, no new rows on its vocabulary.
    "openchat_3.6": Template("<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "GPT4 Correct",
                             header=("<|start_header_id|>", "<|end_header_id|>\n\n")),
    # Not a chat template: a base model's pretraining corpus (prepare_text), documents of plain text with
    # no roles, no conditions and no special tokens. The demo's base model is pretrained on one.
    "text": Template(None, (), ""),
}
ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    weight: float | None = None  # a message's own weight (OpenChat JSONL) wins over its class weight


class SentencePiece:
    """A SentencePiece .model (Llama-2, Mistral, the demo's own)."""
    file_name = "tokenizer.model"

    def __init__(self, path: Path):
        try:
            self.path, self.sp = path, spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({str(e).strip()})") from None
        self.vocab_size, self.bos_id, self.eos_id = self.sp.get_piece_size(), self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} has no BOS or no EOS token")

    def special_id(self, token: str) -> int | None:
        if self.sp.piece_to_id(token) != self.sp.unk_id():
            raise ValueError(f"{self.path} already has a piece {token}: SentencePiece would then find it inside "
                             f"message text; use a model without it")
        return None

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer:
    """A Hugging Face tokenizer.json (byte-level BPE: Llama-3, Qwen2, SmolLM2, GPT-2) through the `tokenizers`
    library. Special tokens typed in text are not recognised (encode_special_tokens); BOS is what the
    tokenizer's post-processor puts before a text, if anything (OpenChat's rule: the ids of "")."""
    file_name = "tokenizer.json"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ValueError(f"{path} needs the `tokenizers` library: pip install tokenizers==0.23.3") from None
        try:
            self.tok = Backend.from_file(str(path))
        except Exception as e:  # the library raises its own exception type for a bad file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library reads: {e}") from None
        self.tok.encode_special_tokens = True
        self.path, self.vocab_size = path, self.tok.get_vocab_size(with_added_tokens=True)
        before = self.tok.encode("", add_special_tokens=True).ids
        if len(before) > 1:
            raise ValueError(f"{path}: its post-processor puts {len(before)} tokens around a text; one BOS at most")
        self.bos_id, self.eos_id = (before or [None])[0], None  # an EOS is not a tokenizer.json's notion

    def special_id(self, token: str) -> int | None:
        i = self.tok.token_to_id(token)
        if i is not None and not getattr(self.tok.get_added_tokens_decoder().get(i), "special", False):
            raise ValueError(f"{self.path} has {token} as an ordinary token: it would be found inside message "
                             f"text; use a tokenizer where it is a special token or absent")
        return i

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:  # the library sets its own threads
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class Tokenizer:
    """A SentencePiece .model or a tokenizer.json, with the template's special tokens: the ones the
    vocabulary has are used as they are (Llama-3's header tokens), the others get new rows after it
    (<|end_of_turn|> is 32000 on Llama-2's 32,000 pieces). Message text is encoded with no special token
    recognised, so one typed in a message stays ordinary text: only the template writes special ids."""

    def __init__(self, path, template: str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}")
        self.path, self.template_name, self.template = Path(path), template, TEMPLATES[template]
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path} is missing or not a file")
        self.backend = HFTokenizer(self.path) if self.path.suffix == ".json" else SentencePiece(self.path)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.base_vocab_size = self.vocab_size = self.backend.vocab_size
        self.special_ids = {}
        for token in self.template.special_tokens:
            own = self.backend.special_id(token)
            if own is None:  # a new row after the vocabulary
                own, self.vocab_size = self.vocab_size, self.vocab_size + 1
            self.special_ids[token] = own
        self.bos_id, self.eos_id = self.backend.bos_id, self.backend.eos_id
        self.eot_id = self.special_ids.get(self.template.eot)
        self.specials_in_prefix = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.backend.encode(texts, threads)

    @lru_cache(maxsize=None)
    def prefix_ids(self, role: str, condition: str) -> list[int]:
        """A role prefix's ids: its special tokens as their ids, the text between them encoded."""
        prefix = self.template.role_prefix(role, condition)
        parts = self.specials_in_prefix.split(prefix) if self.special_ids else [prefix]
        return [i for part in parts if part
                for i in ([self.special_ids[part]] if part in self.special_ids else self.encode([part])[0])]

    def decode(self, ids) -> str:
        names = {i: t for t, i in self.special_ids.items()}
        pieces, run = [], []
        for i in ids:
            if i in names:
                pieces += [self.backend.decode(run), names[i]]
                run = []
            else:
                run.append(int(i))
        return "".join(pieces + [self.backend.decode(run)])


def message_weight(message: Message, class_weight: float) -> float:
    if message.weight is not None:
        return message.weight
    return class_weight if message.role == "assistant" else 0.0  # only answers are learned by default


def tokenize_conversation(tokenizer: Tokenizer, messages: list[Message], condition: str, system: str | None = None,
                          class_weight: float = 1.0, inference: bool = False, per_message_norm: bool = False,
                          encoded: list[list[int]] | None = None) -> tuple[list[int], list[float]]:
    """One conversation → (token ids, per-token weights), weights before the shift (METHOD.md §3).

    BOS and the system prompt and every role prefix weigh 0; a message's text and its EOT weigh the
    message's own weight if it has one, else the class weight for an answer and 0 for a user turn. With
    per_message_norm, a message's weight is spread over its tokens (w / n_tokens). With inference=True
    the ids end with the assistant prefix, ready for the model to answer (weights are then irrelevant).
    `encoded`: the SentencePiece ids of [system] + message texts, when the caller encoded them in bulk."""
    if tokenizer.eot_id is None:
        raise ValueError(f"the {tokenizer.template_name!r} template has no conversation turns")
    texts = ([system] if system else []) + [m.text for m in messages]
    encoded = tokenizer.encode(texts) if encoded is None else encoded
    ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if system:  # 3.6 writes the system prompt as a role
        system_prefix = tokenizer.prefix_ids("system", "") if tokenizer.template.header else []
        ids += system_prefix + encoded[0] + [tokenizer.eot_id]
    weights = [0.0] * len(ids)
    for message, text_ids in zip(messages, encoded[1:] if system else encoded):
        prefix = tokenizer.prefix_ids(message.role, condition)
        w = message_weight(message, class_weight)
        if per_message_norm and w:
            w /= len(text_ids) + 1
        ids += prefix + text_ids + [tokenizer.eot_id]
        weights += [0.0] * len(prefix) + [w] * (len(text_ids) + 1)
    if inference:
        prefix = tokenizer.prefix_ids("assistant", condition)
        ids, weights = ids + prefix, weights + [0.0] * len(prefix)
    return ids, weights


def shift_to_predictions(weights: list[float]) -> np.ndarray:
    """METHOD.md §3's shift, done here and only here: position t predicts token t+1, so it carries token
    t+1's weight, and the last position, which predicts nothing, weighs 0. Datasets store these weights, one
    per position; pack_stream pairs each position with its target, the next token of its conversation."""
    return np.array(weights[1:] + [0.0], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# 2. Sources, files and records (METHOD.md §4)


class BadInput(ValueError):
    """A record we cannot use. str() names the file, line and problem; `reason` is the key --skip-bad
    counts it under."""

    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


class UnreadableFile(ValueError):
    """A file that cannot be read record by record: not skipped even with --skip-bad, since the records
    after the fault could not be counted (a JSON array broken mid-file, text after its closing ']')."""


@dataclass
class Source:
    condition: str
    weight: float
    files: list[Path]


@dataclass
class Conversation:
    messages: list[Message]
    condition: str
    system: str | None
    class_id: int  # the index of its source: its class
    where: str  # file and line, for messages about it


def parse_source_flag(text: str) -> Source:
    """CONDITION:WEIGHT:FILE[,FILE...], as given to --source."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise ValueError(f"--source={text!r}: expected CONDITION:WEIGHT:FILE[,FILE...]")
    return Source(parts[0], parse_weight(parts[1], f"--source={text!r}"), [Path(f) for f in parts[2].split(",")])


def read_source_spec(path: Path) -> list[Source]:
    """A JSON list of {"condition", "weight", "files"}; relative file names are relative to the spec."""
    expected = f"{path}: expected a JSON list of {{\"condition\": str, \"weight\": number, \"files\": [str, ...]}}"
    try:
        spec = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{expected} ({e})") from None
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{expected}, not {json.dumps(spec)[:60]}")
    sources = []
    for i, s in enumerate(spec):
        files = s.get("files") if isinstance(s, dict) else None
        if not (isinstance(files, list) and files and all(isinstance(f, str) and f for f in files)
                and isinstance(s.get("condition"), str)):
            raise ValueError(f"{expected}; source {i} is {json.dumps(s)[:80]}")
        sources.append(Source(checked_utf8(s["condition"], f"{path}: source {i}", "its condition"),
                              parse_weight(s.get("weight"), f"{path}: source {i}"), [path.parent / f for f in files]))
    return sources


def parse_weight(value, where: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: weight {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}: weight {value!r} must be a finite number >= 0")
    return weight


def read_text(path: Path) -> str:
    """A file's text. Invalid UTF-8 is kept as lone surrogates and refused where it is used; a UTF-8 byte
    order mark is dropped."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def parse_int(digits: str):
    """Integers longer than Python converts (4,300 digits) read as infinity: the field that holds one is then
    refused with its record named, instead of json raising with no line."""
    return int(digits) if len(digits) < 4300 else math.inf


DECODER = json.JSONDecoder(parse_int=parse_int)


def read_records(path: Path):
    """Yields (record, where) for each record of a JSON array or a JSONL file, or (BadInput, where) for
    one that cannot be parsed. A .jsonl file is JSONL; another is a JSON array if it starts with '['. A file
    with no record at all is an error, not an empty dataset."""
    text = read_text(path)
    array = path.suffix != ".jsonl" and text.lstrip().startswith("[")
    found = 0
    for found, item in enumerate(read_json_array(text, path) if array else read_jsonl(text, path), 1):
        yield item
    if not found:
        raise UnreadableFile(f"{path} holds no records")


def read_jsonl(text: str, path: Path):
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield DECODER.decode(line), f"{path}:{n}"
            except json.JSONDecodeError as e:
                yield BadInput("malformed_json", f"{path}:{n}", f"malformed JSON: {e.msg} (column {e.colno})"), ""
            except RecursionError:
                yield BadInput("malformed_json", f"{path}:{n}", "JSON nested too deeply to read"), ""


def read_json_array(text: str, path: Path):
    """Record by record (json.JSONDecoder.raw_decode). A file cut off inside its last record (the real
    ShareGPT file is one) yields what precedes the cut and then the cut record as bad input. A fault
    anywhere else leaves the following records unfindable: UnreadableFile."""
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted, index = 1, 0, 0
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        where = f"{path}:{line} (record {index})"
        try:
            record, pos = DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip()):
                yield BadInput("malformed_json", where, "malformed JSON: the file ends inside this record"), ""
                return
            raise UnreadableFile(f"{where}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno}); the "
                                 f"records after it cannot be found in a JSON array: fix it, or write the file as "
                                 f"JSONL (one record per line), where --skip-bad can skip a bad line") from None
        except RecursionError:
            raise UnreadableFile(f"{where}: JSON nested too deeply to read") from None
        yield record, where
        index += 1
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise UnreadableFile(f"{where}: malformed JSON: expected ',' or ']' after the record")
    line += text.count("\n", counted, pos)
    if text[pos + 1:].strip():
        raise UnreadableFile(f"{path}:{line}: text after the array's closing ']'")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def get_field(obj, key: str, kind, where: str, what: str, required=True):
    if key not in obj:
        if required:
            raise BadInput("missing_field", where, f"{what} has no {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = "a number" if kind == (int, float) else kind.__name__
        raise BadInput("wrong_type", where, f"{what}: {key!r} is {type(value).__name__}, not {expected}")
    return value


def checked_text(text: str, where: str, what: str) -> str:
    if not text.strip():
        raise BadInput("empty_message", where, f"{what} is empty")
    return checked_utf8(text, where, what)


def checked_utf8(text: str, where: str, what: str) -> str:
    """Invalid UTF-8 in a file, or a lone surrogate escaped in its JSON, cannot be tokenized: refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput("invalid_utf8", where, f"{what} is not valid UTF-8 (at character {e.start})") from None
    return text


def parse_record(record, source: Source, class_id: int, where: str) -> Conversation:
    """A ShareGPT record ({"conversations": [{"from", "value"}]}) or an OpenChat one ({"items": [{"role",
    "content", "weight"?}], "condition"?, "system"?}) as a Conversation."""
    if not isinstance(record, dict):
        raise BadInput("wrong_type", where, f"a record must be a JSON object, not {type(record).__name__}")
    if "items" in record:
        items = get_field(record, "items", list, where, "the record")
        condition = get_field(record, "condition", str, where, "the record", required=False)
        system = get_field(record, "system", str, where, "the record", required=False) or None
        for value, what in ((condition, "its condition"), (system, "its system message")):
            if value is not None:
                checked_utf8(value, where, what)
        messages = []
        for i, item in enumerate(items):
            what = f"item {i}"
            if not isinstance(item, dict):
                raise BadInput("wrong_type", where, f"{what} is not an object")
            role = get_field(item, "role", str, where, what)
            if role not in ROLE_NAMES:
                raise BadInput("unknown_role", where, f"{what}: unknown role {role!r} (user, assistant)")
            weight = get_field(item, "weight", (int, float), where, what, required=False)
            if weight is not None and not (math.isfinite(weight) and weight >= 0):
                raise BadInput("bad_weight", where, f"{what}: weight {weight} must be finite and >= 0")
            text = checked_text(get_field(item, "content", str, where, what), where, what)
            messages.append(Message(role, text, None if weight is None else float(weight)))
    elif "conversations" in record:
        turns = get_field(record, "conversations", list, where, "the record")
        condition, system, messages = None, None, []
        for i, turn in enumerate(turns):
            what = f"message {i}"
            if not isinstance(turn, dict):
                raise BadInput("wrong_type", where, f"{what} is not an object")
            role = SHAREGPT_ROLES.get(get_field(turn, "from", str, where, what))
            if role is None:
                raise BadInput("unknown_role", where, f"{what}: unknown role {turn['from']!r} "
                                                      f"(one of {', '.join(SHAREGPT_ROLES)})")
            text = checked_text(get_field(turn, "value", str, where, what), where, what)
            if role == "system":
                if i != 0:
                    raise BadInput("unknown_role", where, f"{what}: a system message must come first")
                system = text
            else:
                messages.append(Message(role, text))
    else:
        raise BadInput("missing_field", where, "the record has neither 'conversations' (ShareGPT) nor 'items' "
                                               "(OpenChat)")
    if not messages:
        raise BadInput("empty_conversation", where, "the conversation has no messages")
    return Conversation(messages, source.condition if condition is None else condition, system, class_id, where)


def read_conversations(sources: list[Source], skip_bad: bool, counts: Counter) -> list[Conversation]:
    """Every conversation of every source. Bad input raises, or with skip_bad is counted by reason.
    Leading assistant turns are removed: ShareGPT splits long conversations, and a part that starts
    with an answer has lost its question (FastChat's training code skips them the same way)."""
    conversations = []
    for class_id, source in enumerate(sources):
        for path in source.files:
            for record, where in read_records(path):
                try:
                    if isinstance(record, BadInput):
                        raise record
                    conversation = parse_record(record, source, class_id, where)
                except BadInput as bad:
                    if not skip_bad:
                        raise
                    counts[bad.reason] += 1
                    continue
                leading = next((i for i, m in enumerate(conversation.messages) if m.role == "user"),
                               len(conversation.messages))
                if leading:
                    counts["leading_assistant_turns_removed"] += 1
                    conversation.messages = conversation.messages[leading:]
                conversations.append(conversation)
    return conversations


# ---------------------------------------------------------------------------------------------------------
# 3. prepare: files → tokenized dataset directory


@dataclass
class PrepareConfig:
    source: list[str] = arg([], "a source as CONDITION:WEIGHT:FILE[,FILE...] (repeat for each source)")
    sources: str = arg("", "or a JSON spec file: [{\"condition\", \"weight\", \"files\"}]")
    tokenizer: str = arg("", "the base model's tokenizer: a SentencePiece .model or a tokenizer.json")
    template: str = arg("openchat_3.5", f"conversation template: {', '.join(TEMPLATES)}")
    out: str = arg("", "output directory (replaced if it holds a dataset)")
    max_len: int = arg(4096, "context length: the longest conversation in tokens")
    truncate: bool = arg(False, "cut longer conversations to max_len instead of treating them as bad input")
    skip_bad: bool = arg(False, "skip bad records and count them by reason, instead of stopping at the first")
    holdout: float = arg(0.0, "fraction of conversations held out for evaluation")
    seed: int = arg(0, "seed of the held-out split")
    inference_condition: str = arg("", "the condition to prompt the trained model with, one of the sources'; empty: "
                                       "the highest-weight source's")
    zero_refusals: bool = arg(False, "weight 0 for answers with refusal boilerplate ('As an AI language model')")
    per_message_norm: bool = arg(False, "spread each message's weight over its tokens (w / n_tokens)")
    threads: int = arg(os.cpu_count() or 1, "tokenizer threads")


# Refusal boilerplate that the reference data cleaning removed from answers (METHOD.md §3).
REFUSAL = re.compile(r"as an ai language model|as a language model|as an ai model|i'm sorry, but as an ai|"
                     r"i am sorry, but as an ai|i cannot fulfill|i'm unable to assist", re.IGNORECASE)
ARRAYS = ("tokens", "weights", "offsets", "lengths", "classes")
FORMAT = 2  # of meta.json; 2: the tokenizer's file name ("tokenizer.model" or "tokenizer.json") is recorded


class Progress:
    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.tokens = what, total, 0, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int, tokens: int, final=False):
        self.done, self.tokens = self.done + n, self.tokens + tokens
        now = time.perf_counter()
        if now - self.last >= 2 or final:
            self.last, elapsed = now, max(now - self.start, 1e-9)
            rate = self.done / elapsed
            print(f"{self.what}: {self.done:,}/{self.total:,} conversations, {rate:,.0f} conv/s, "
                  f"{self.tokens / elapsed / 1e6:.2f}M tokens/s, "
                  + (f"done in {elapsed:.1f}s" if final else f"ETA {(self.total - self.done) / rate:.0f}s"),
                  file=sys.stderr, flush=True)


def tokenize_all(conversations, sources, tokenizer, cfg: PrepareConfig, counts: Counter):
    """→ list of (token ids int32, target weights float32, class id), dropping conversations with no
    supervised token. Message texts are encoded in bulk (SentencePiece's threads), a batch at a time."""
    rows, progress = [], Progress("tokenizing", len(conversations))
    for start in range(0, len(conversations), 2000):
        batch = conversations[start:start + 2000]
        encoded = tokenizer.encode([t for c in batch for t in ([c.system] if c.system else []) +
                                    [m.text for m in c.messages]], threads=cfg.threads)
        n_tokens, i = 0, 0
        for c in batch:
            n_texts = len(c.messages) + bool(c.system)
            if cfg.zero_refusals:
                for m in c.messages:
                    if m.role == "assistant" and REFUSAL.search(m.text):
                        m.weight = 0.0
                        counts["refusals_zeroed"] += 1
            ids, weights = tokenize_conversation(tokenizer, c.messages, c.condition, c.system,
                                                 sources[c.class_id].weight, per_message_norm=cfg.per_message_norm,
                                                 encoded=encoded[i:i + n_texts])
            i += n_texts
            n_tokens += len(ids)
            if len(ids) > cfg.max_len:
                if not cfg.truncate:
                    bad = BadInput("too_long", c.where, f"{len(ids)} tokens, longer than max_len={cfg.max_len} "
                                                        f"(--truncate cuts it, --skip-bad skips it)")
                    if not cfg.skip_bad:
                        raise bad
                    counts[bad.reason] += 1
                    continue
                ids, weights = ids[:cfg.max_len], weights[:cfg.max_len]
                counts["truncated"] += 1
            target_weights = shift_to_predictions(weights)
            if not target_weights.any():
                counts["no_supervised_token"] += 1
                continue
            rows.append((np.array(ids, dtype=np.int32), target_weights, c.class_id))
        progress.update(len(batch), n_tokens, final=start + 2000 >= len(conversations))
    return rows


def expert_condition(sources: list[Source], template: Template) -> str:
    """The condition to prompt with at inference: the expert's, i.e. the highest-weight source's (METHOD.md §1);
    on a tie the template's own when it is one of them (e.g. "GPT4"), else the first listed."""
    top = max(s.weight for s in sources)
    tied = [s.condition for s in sources if s.weight == top]
    return template.inference_condition if template.inference_condition in tied else tied[0]


def split_stats(rows, n_classes) -> dict:
    per_class = [{"conversations": 0, "tokens": 0, "supervised_tokens": 0, "weight_sum": 0.0}
                 for _ in range(n_classes)]
    for ids, targets, c in rows:
        s = per_class[c]
        s["conversations"] += 1
        s["tokens"] += len(ids)
        s["supervised_tokens"] += int(np.count_nonzero(targets))
        s["weight_sum"] += float(targets.sum(dtype=np.float64))
    total = {k: sum(s[k] for s in per_class) for k in per_class[0]}
    return {**total, "per_class": per_class}


def write_split(directory: Path, rows):
    directory.mkdir(parents=True)
    lengths = np.array([len(ids) for ids, _, _ in rows], dtype=np.int32)
    arrays = {
        "tokens": np.concatenate([ids for ids, _, _ in rows]) if rows else np.zeros(0, np.int32),
        "weights": np.concatenate([t for _, t, _ in rows]) if rows else np.zeros(0, np.float32),
        "offsets": np.cumsum(lengths, dtype=np.int64) - lengths,
        "lengths": lengths,
        "classes": np.array([c for _, _, c in rows], dtype=np.int32),
    }
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)


def prepare(cfg: PrepareConfig) -> dict:
    """Reads, tokenizes and writes a dataset directory: meta.json plus train/ (and holdout/) arrays.
    Written under a temporary name and renamed when complete; returns meta."""
    if not cfg.out or not cfg.tokenizer or not (cfg.source or cfg.sources):
        raise ValueError("prepare needs --out, --tokenizer and --source (or --sources)")
    check_split_options(cfg.max_len, cfg.holdout)
    out = Path(cfg.out)
    check_replaceable(out)
    start = time.perf_counter()
    sources = [parse_source_flag(s) for s in cfg.source]
    sources += read_source_spec(Path(cfg.sources)) if cfg.sources else []
    tokenizer = Tokenizer(cfg.tokenizer, cfg.template)
    counts = Counter()
    conversations = read_conversations(sources, cfg.skip_bad, counts)
    n_records = len(conversations) + sum(counts.values()) - counts["leading_assistant_turns_removed"]
    rows = tokenize_all(conversations, sources, tokenizer, cfg, counts)

    bad_reasons = ("malformed_json", "missing_field", "wrong_type", "unknown_role", "empty_conversation",
                   "empty_message", "invalid_utf8", "bad_weight", "too_long")
    conditions = sorted({c.condition for c in conversations})
    if cfg.inference_condition and cfg.inference_condition not in conditions:
        raise ValueError(f"--inference-condition={cfg.inference_condition!r} is not a condition of the data "
                         f"({', '.join(map(repr, conditions))}): the model would be prompted with one it never saw")
    how = {
        "template": cfg.template,
        "inference_condition": cfg.inference_condition or expert_condition(sources, tokenizer.template),
        "conditions": conditions,
        "sources": [{"condition": s.condition, "weight": s.weight, "files": [str(f) for f in s.files]}
                    for s in sources],
        "max_len": cfg.max_len,
        "options": {k: getattr(cfg, k) for k in ("truncate", "skip_bad", "holdout", "seed", "zero_refusals",
                                                 "per_message_norm")},
        "read": {"records": n_records},
        "skipped_bad_input": {r: counts[r] for r in bad_reasons if counts[r]},
        "dropped": {"no_supervised_token": counts["no_supervised_token"]},
        "modified": {k: counts[k] for k in ("leading_assistant_turns_removed", "truncated", "refusals_zeroed")},
    }
    meta = write_dataset(out, rows, tokenizer, how, cfg.holdout, cfg.seed)
    print_summary(meta, time.perf_counter() - start)
    return meta


def prepare_text(corpus: Path, tokenizer_path, out: Path, max_len: int, holdout: float = 0.0, seed: int = 0) -> dict:
    """A base model's pretraining corpus → a dataset directory that train.py reads like any other. The
    corpus is JSONL of {"text"}; each document becomes BOS + its pieces + EOS and every token is learned
    with weight 1: plain language modelling, no template, no condition, one class."""
    check_replaceable(Path(out))
    check_split_options(max_len, holdout)
    start = time.perf_counter()
    tokenizer = Tokenizer(tokenizer_path, "text")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer_path}: a base corpus needs a tokenizer with BOS and EOS (a SentencePiece model)")
    records = read_texts(Path(corpus))
    rows = []
    for pieces, (_, where) in zip(tokenizer.encode([t for t, _ in records], threads=os.cpu_count() or 1), records):
        ids = [tokenizer.bos_id] + pieces + [tokenizer.eos_id]  # a SentencePiece model has both
        if len(ids) > max_len:
            raise BadInput("too_long", where, f"{len(ids)} tokens, longer than max_len={max_len}")
        # Every token after BOS is learned: weight 1, BOS's 0 (nothing predicts it).
        rows.append((np.array(ids, dtype=np.int32), shift_to_predictions([0.0] + [1.0] * (len(ids) - 1)), 0))
    how = {"template": "text", "inference_condition": "", "conditions": [""],
           "sources": [{"condition": "", "weight": 1.0, "files": [str(corpus)]}], "max_len": max_len,
           "options": {"holdout": holdout, "seed": seed}, "read": {"records": len(records)},
           "skipped_bad_input": {}, "dropped": {}, "modified": {}}
    meta = write_dataset(Path(out), rows, tokenizer, how, holdout, seed)
    print_summary(meta, time.perf_counter() - start)
    return meta


def read_texts(path: Path) -> list[tuple[str, str]]:
    """(text, where) for each record {"text"} of a plain-text JSONL file; bad input names file and line."""
    texts = []
    for record, where in read_records(path):
        if isinstance(record, BadInput):
            raise record
        if not isinstance(record, dict):
            raise BadInput("wrong_type", where, f"a record must be a JSON object, not {type(record).__name__}")
        texts.append((checked_text(get_field(record, "text", str, where, "the record"), where, "the text"), where))
    return texts


def check_tokenizer_file(path: Path, expected_sha256: str, what: str, hint: str = ""):
    """A tokenizer file must be byte for byte the one `what` (its recorded sha256): another would give other ids."""
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if sha != expected_sha256:
        raise ValueError(f"{path} (sha256 {sha[:12]}…) is not the tokenizer {what} (sha256 "
                         f"{expected_sha256[:12]}…){hint}")


def check_split_options(max_len: int, holdout: float):
    if max_len < 2:
        raise ValueError(f"--max-len={max_len}: a conversation needs at least 2 tokens")
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout={holdout}: a fraction in [0, 1)")


def check_replaceable(out: Path):
    if out.exists() and not (out / "meta.json").exists():
        raise FileExistsError(f"{out} exists and is not a dataset directory: refusing to replace it")


def write_dataset(out: Path, rows, tokenizer: Tokenizer, how: dict, holdout: float, seed: int) -> dict:
    """The rows split at random into train and holdout, written with the tokenizer itself and meta.json:
    the tokenizer's description, `how` the dataset was made and each split's counts. Written under a
    temporary name and renamed when complete; returns meta."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_holdout = round(holdout * len(rows))
    splits = {"train": [rows[i] for i in sorted(order[n_holdout:])],
              "holdout": [rows[i] for i in sorted(order[:n_holdout])]}
    meta = {
        "format": FORMAT,
        "tokenizer": {"path": str(tokenizer.path.resolve()), "file": tokenizer.backend.file_name,
                      "sha256": tokenizer.sha256, "base_vocab_size": tokenizer.base_vocab_size,
                      "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "special_tokens": tokenizer.special_ids},
        **how,
        "splits": {name: split_stats(split, len(how["sources"])) for name, split in splits.items()},
    }
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, split in splits.items():
            write_split(tmp / name, split)
        shutil.copyfile(tokenizer.path, tmp / tokenizer.backend.file_name)  # the dataset carries its tokenizer
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_directory(tmp, out)
    except BaseException:  # a full disk, an unwritable folder, Ctrl-C: no partial dataset is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def print_summary(meta: dict, seconds: float):
    print("\n| split | class | condition | weight | conversations | tokens | supervised tokens |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, split in meta["splits"].items():
        if not split["conversations"]:
            continue
        for c, (s, src) in enumerate(zip(split["per_class"], meta["sources"])):
            print(f"| {name} | {c} | {src['condition']} | {src['weight']} | {s['conversations']:,} | "
                  f"{s['tokens']:,} | {s['supervised_tokens']:,} |")
    print(f"\nread {meta['read']['records']:,} records in {seconds:.1f}s; skipped as bad input: "
          f"{meta['skipped_bad_input'] or 'none'}; dropped: {meta['dropped']}; modified: {meta['modified']}")


@dataclass
class Split:
    """One split of a dataset directory, memory-mapped: conversation i is tokens[offsets[i]:][:lengths[i]],
    with target weights alongside (weights[t] is the weight of predicting tokens[t + 1])."""
    tokens: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    classes: np.ndarray


def load_meta(path) -> dict:
    meta_path = Path(path) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: is {path} a dataset made by `python data.py prepare`?")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not the format {FORMAT} this code reads: "
                         f"prepare the data again")
    return meta


def load_split(path, split: str = "train") -> Split:
    load_meta(path)
    arrays = {}
    for name in ARRAYS:
        file = Path(path) / split / f"{name}.npy"
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing: the dataset directory is incomplete")
        arrays[name] = np.load(file, mmap_mode="r")
    return Split(**arrays)


# ---------------------------------------------------------------------------------------------------------
# 4. Multipack (METHOD.md §5): conversations → per-rank packed streams


def fits(lengths, capacity: int, n_bins: int) -> bool:
    """First-fit decreasing: do these conversations fit into n_bins bins of capacity tokens?"""
    free = np.full(n_bins, capacity)
    for length in sorted(lengths, reverse=True):
        room = np.flatnonzero(free >= length)
        if not len(room):
            return False
        free[room[0]] -= length
    return True


def first_fit_decreasing(indices, lengths, capacity: int, n_bins: int) -> list[list[int]]:
    bins, free = [[] for _ in range(n_bins)], np.full(n_bins, capacity)
    for i in sorted(indices, key=lambda i: -lengths[i]):
        b = np.flatnonzero(free >= lengths[i])[0]
        bins[b].append(int(i))
        free[b] -= lengths[i]
    return bins


def multipack(lengths, batch_max_len: int, world_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """The steps of one epoch: steps[s][r] is the list of conversations rank r packs at step s.

    Shuffle (seed, epoch); then, step after step, take the longest prefix of the remaining conversations
    that first-fit decreasing packs into world_size bins of batch_max_len tokens (a binary search over the
    prefix length), one bin per rank. Every rank gets the same number of steps; the conversations left at
    the end that cannot fill every rank's bin wait for the next epoch's shuffle."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > batch_max_len:
        i = int(lengths.argmax())
        raise ValueError(f"conversation {i} has {lengths[i]} tokens, more than batch_max_len={batch_max_len}")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    cumulative = np.cumsum(lengths[order])
    steps, start, consumed = [], 0, 0
    while start < len(order):
        # No prefix longer than what world_size full bins could hold can fit.
        hi = int(np.searchsorted(cumulative, consumed + batch_max_len * world_size, side="right")) - start + 1
        lo = 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(lengths[order[start:start + mid]], batch_max_len, world_size):
                lo = mid
            else:
                hi = mid
        bins = first_fit_decreasing(order[start:start + lo], lengths, batch_max_len, world_size)
        if any(not b for b in bins):  # not enough left to give every rank a stream
            break
        steps.append(bins)
        start += lo
        consumed = int(cumulative[start - 1])
    return steps


def packing_efficiency(lengths, steps, batch_max_len: int) -> float:
    """Tokens packed / tokens of capacity over all the bins of all the steps."""
    packed = sum(int(np.sum(np.asarray(lengths)[b])) for step in steps for b in step)
    return packed / max(1, sum(len(step) for step in steps) * batch_max_len)


def pack_stream(split: Split, conversations: list[int]) -> dict:
    """One rank's stream for one step: the conversations concatenated with no padding, positions
    restarting at 0 in each, cu_seqlens at the boundaries, targets = the next token of the same
    conversation, which the stored weights already belong to (shift_to_predictions); the last token of each
    predicts nothing and weighs 0."""
    starts, lengths = split.offsets[conversations], split.lengths[conversations]
    index = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    tokens = np.asarray(split.tokens[index], dtype=np.int64)
    targets = np.roll(tokens, -1)
    ends = np.cumsum(lengths) - 1
    targets[ends] = 0  # weight 0 there: never read by the loss
    return {
        "tokens": tokens,
        "targets": targets,
        "weights": np.asarray(split.weights[index], dtype=np.float32),
        "positions": np.concatenate([np.arange(n) for n in lengths]),
        "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
        "classes": np.repeat(split.classes[conversations], lengths),
    }


# ---------------------------------------------------------------------------------------------------------
# 5. A SentencePiece tokenizer


@dataclass
class TokenizerConfig:
    corpus: list[str] = arg([], "ShareGPT or OpenChat files whose message texts train the tokenizer")
    text: list[str] = arg([], "plain-text JSONL files ({\"text\"}), such as a base model's corpus, to learn from too")
    vocab_size: int = arg(4096, "vocabulary size, before the template's special tokens")
    conditions: list[str] = arg([], "conditions whose role prefixes the corpus includes, one per message")
    split_digits: bool = arg(True, "one piece per digit, as Llama's and Mistral's tokenizers have")
    out: str = arg("tokenizer.model", "the SentencePiece model to write")


def train_tokenizer(cfg: TokenizerConfig):
    """A byte-fallback BPE model set up as Llama's: no normalisation, unk 0, BOS 1, EOS 2, digits split."""
    counts = Counter()
    sources = [Source("", 1.0, [Path(f) for f in cfg.corpus])]
    conversations = read_conversations(sources, skip_bad=True, counts=counts)
    texts = [t for c in conversations for t in ([c.system] if c.system else []) + [m.text for m in c.messages]]
    # The role prefixes as the template will write them, so that "GPT4 Assistant:" gets whole pieces.
    texts += [TEMPLATES["openchat_3.5"].role_prefix(m.role, condition)
              for c in conversations for m in c.messages for condition in cfg.conditions]
    texts += [text for path in cfg.text for text, _ in read_texts(Path(path))]
    # No piece joins a digit to a letter or punctuation ("12." stays "12" + "."), as GPT-2-style
    # pre-tokenizers keep numbers apart: a delimiter pieces never cross, seen only in training.
    texts = [re.sub(r"(?<=\d)(?=[^\d\s])|(?<=[^\d\s])(?=\d)", "\x1f", t) for t in texts]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=cfg.vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=cfg.split_digits, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        pretokenization_delimiter="\x1f")
    write_atomically(Path(cfg.out), lambda tmp: tmp.write_bytes(model.getvalue()))
    print(f"wrote {cfg.out}: {cfg.vocab_size} pieces from {len(conversations):,} conversations and {len(cfg.text)} "
          f"text file(s)"
          + (f" (skipped bad records: {dict(counts)})" if counts else ""))


# ---------------------------------------------------------------------------------------------------------
# 6. show: what the model learns from one conversation


@dataclass
class ShowConfig:
    data: str = arg("", "a dataset directory made by `python data.py prepare`")
    split: str = arg("train", "train or holdout")
    index: int = arg(0, "which conversation of the split")


def show_weights(cfg: ShowConfig) -> str:
    """A prepared conversation as C-RLFT sees it: the text the model only reads printed plain, each run of
    tokens it learns to predict in brackets with its weight, [0.1| like this]. Returns the text shown."""
    meta, split = load_meta(cfg.data), load_split(cfg.data, cfg.split)
    if not 0 <= cfg.index < len(split.lengths):
        raise ValueError(f"--index={cfg.index}: the {cfg.split} split has {len(split.lengths)} conversations")
    tokenizer = Tokenizer(Path(cfg.data) / meta["tokenizer"]["file"], meta["template"])
    start, n = split.offsets[cfg.index], split.lengths[cfg.index]
    ids, weights = split.tokens[start:start + n].tolist(), split.weights[start:start + n].tolist()
    # Decoding ever longer prefixes gives each token's text with the spaces a tokenizer puts between pieces.
    prefixes = [tokenizer.decode(ids[:k]) for k in range(n + 1)]
    texts = [prefixes[k + 1][len(prefixes[k]):] for k in range(n)]
    shown = texts[0]  # the first token: read, never predicted
    for t in range(n - 1):  # position t predicts token t + 1 with weight weights[t]
        opens = weights[t] and (t == 0 or weights[t - 1] != weights[t])
        closes = weights[t] and (t == n - 2 or weights[t + 1] != weights[t])
        shown += (f"[{weights[t]:g}|" if opens else "") + texts[t + 1] + ("]" if closes else "")
    condition = meta["sources"][split.classes[cfg.index]]["condition"]
    print(f"{cfg.data}, {cfg.split} conversation {cfg.index} of {len(split.lengths)}: class "
          f"{split.classes[cfg.index]} ({condition!r}), {n} tokens, {sum(w > 0 for w in weights)} learned; "
          f"[w| text] is learned with weight w, the rest only read\n\n{shown}")
    return shown


def main(argv):
    commands = {
        "prepare": (PrepareConfig, prepare, "tokenize sources into a dataset directory"),
        "tokenizer": (TokenizerConfig, train_tokenizer, "train a SentencePiece tokenizer on conversation files"),
        "show": (ShowConfig, show_weights, "print a prepared conversation with the weight of each learned token"),
    }
    if not argv or argv[0] not in commands:
        print(__doc__ + "\ncommands: " + ", ".join(f"{name} ({doc})" for name, (_, _, doc) in commands.items())
              + "\n`python data.py COMMAND --help` lists a command's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    config_class, run, doc = commands[argv[0]]
    try:
        run(parse(config_class, argv[1:], doc))
    except (ValueError, OSError) as e:  # bad input, a missing or unwritable file, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
