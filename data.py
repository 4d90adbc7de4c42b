"""Mixed-quality conversations → conditioned, weighted token arrays: the data half of C-RLFT.

  python data.py prepare --source="GPT4:1.0:gpt4.json" --source="GPT3:0.1:gpt35.jsonl" \\
                         --tokenizer=tokenizer.model --out=data/mine
  python data.py show --data=data/demo/dataset --index=3   # what C-RLFT learns from a conversation

Read top to bottom (METHOD.md §2 and §6):
  1. The template: the tokens a conversation becomes, its condition in every role prefix.
  2. The weights and the shift onto the positions that predict them: the method's first hop.
  3. The same template as Jinja, for the exports.
  4. prepare: every conversation tokenised, weighted, shifted and written as memory-mapped arrays.
  5. Multipack: conversations into packed streams per rank, at train time.
  6. show: a prepared conversation with the weight of each token.
Users' files are read and checked by infra/records.py; tokenizer files are
infra/tokenizer_files.py's.
"""

import hashlib
import io
import itertools
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from infra.cli import Progress, arg, run_commands
from infra.files import (check_writable_folder, read_json, write_bytes, write_directory,
                         write_json)
from infra.records import (Message, Source, counts_report, keep_cut, parse_source_flag,
                           read_conversations, read_source_spec, reference_cleaning)
from infra.tokenizer_files import open_tokenizer_file

# --------------------------------------------------------------------------------------------------
# 1. The conversation template

EOT = "<|end_of_turn|>"
ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


@dataclass(frozen=True)
class Template:
    """OpenChat's templates: BOS, [system + EOT], then per turn a role prefix that carries the
    condition ("GPT4 User:"), the text and EOT; each family its prefixes and special tokens."""
    eot: str | None  # the token ending every turn; None: no turns (the "text" template)
    special_tokens: tuple[str, ...]  # written as single ids: the tokenizer's own, or new rows
    inference_condition: str
    header: tuple[str, str] | None = None  # 3.6: the role between Llama-3's header tokens

    def role_prefix(self, role: str, condition: str) -> str:
        """Returns the text before a message, special tokens spelt out: "GPT4 User:" (v3.2, 3.5) or
        "<|start_header_id|>GPT4 User<|end_header_id|>\\n\\n" (3.6); with no condition "User:"."""
        name = f"{condition} {ROLE_NAMES[role]}".strip()
        return f"{self.header[0]}{name}{self.header[1]}" if self.header else f"{name}:"


TEMPLATES = {
    "openchat_v3.2": Template(EOT, (EOT,), "GPT4"),  # the paper's model (Llama-2-13B)
    "openchat_3.5": Template(EOT, (EOT, "<|pad_0|>"), "GPT4 Correct"),  # Mistral-7B
    # OpenChat 3.6 (Llama-3-8B): Llama-3's own tokens (no new rows); the system prompt is a role.
    "openchat_3.6": Template(
        "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "GPT4 Correct",
        header=("<|start_header_id|>", "<|end_header_id|>\n\n")),
    "text": Template(None, (), ""),  # no turns: a base's pretraining corpus (demo.prepare_text)
}


class Tokenizer:
    """A tokenizer file with the template's special tokens: those the vocabulary has are used as
    they are (Llama-3's header tokens), the others get new rows after it (<|end_of_turn|> is 32000
    on Llama-2's 32,000 pieces). Message text is encoded with no special token recognised: one typed
    in a message stays ordinary text, and only the template writes special ids."""

    def __init__(self, path, template: str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}")
        self.path = Path(path)
        self.template_name = template
        self.template = TEMPLATES[template]
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path} is missing or not a file")
        self.backend = open_tokenizer_file(self.path)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.base_vocab_size = self.vocab_size = self.backend.vocab_size
        self.special_ids = {}
        for token in self.template.special_tokens:
            own = self.backend.special_id(token)
            if own is None:  # a new row after the vocabulary
                own = self.vocab_size
                self.vocab_size += 1
            self.special_ids[token] = own
        self.bos_id, self.eos_id = self.backend.bos_id, self.backend.eos_id
        self.eot_id = self.special_ids.get(self.template.eot)
        self.specials = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.backend.encode(texts, threads)

    @lru_cache(maxsize=None)
    def prefix_ids(self, role: str, condition: str) -> list[int]:
        """Encodes a role prefix: its special tokens as their ids, the text between them encoded."""
        prefix = self.template.role_prefix(role, condition)
        parts = self.specials.split(prefix) if self.special_ids else [prefix]
        return [i for part in parts if part for i in
                ([self.special_ids[part]] if part in self.special_ids else self.encode([part])[0])]

    def decode(self, ids) -> str:
        """Decodes ids, the template's special tokens spelt out, the runs between them as text."""
        names = {i: t for t, i in self.special_ids.items()}
        runs = itertools.groupby(map(int, ids), key=lambda i: i in names)
        return "".join("".join(names[i] for i in run) if special else self.backend.decode(list(run))
                       for special, run in runs)


# --------------------------------------------------------------------------------------------------
# 2. The weights and the shift (METHOD.md §2)


def message_weight(message: Message, class_weight: float) -> float:
    if message.weight is not None:
        return message.weight
    return class_weight if message.role == "assistant" else 0.0  # only answers are learned


def tokenize_conversation(tokenizer: Tokenizer, messages: list[Message], condition: str,
                          system: str | None = None, class_weight: float = 1.0,
                          inference: bool = False, per_message_norm: bool = False,
                          encoded: list[list[int]] | None = None) -> tuple[list, list]:
    """Writes a conversation in the template: (token ids, each token's weight), before the shift.

    BOS, the system prompt and every role prefix weigh 0; a message's text and its EOT weigh the
    message's own weight if it has one, else the class weight for an answer and 0 for a user turn.
    With per_message_norm, a message's weight is spread over its tokens (w / n_tokens). With
    inference=True the ids end with the assistant prefix, ready for the model to answer. `encoded`:
    the ids of [system] + message texts, when the caller encoded them in bulk."""
    if tokenizer.eot_id is None:
        raise ValueError(f"the {tokenizer.template_name!r} template has no conversation turns")
    if encoded is None:
        encoded = tokenizer.encode(([system] if system else []) + [m.text for m in messages])
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
        ids += prefix
        weights += [0.0] * len(prefix)
    return ids, weights


def shift_to_predictions(weights: list[float]) -> np.ndarray:
    """Shifts the weights, here and only here: position t predicts token t+1, so it carries token
    t+1's weight, and the last position, which predicts nothing, weighs 0. These target weights are
    what a dataset stores, pack_stream hands on and the loss multiplies, one per position."""
    return np.array(weights[1:] + [0.0], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# 3. The same template for the exports: Jinja, and ollama's Modelfile (tests hold both to it)


def turn_prefixes(tokenizer: Tokenizer, condition: str) -> dict[str, str]:
    """Returns the text before each role's message at a condition, and the generation prompt: the
    text of tokenize_conversation's ids (the space: SentencePiece's dummy prefix of a message)."""
    template = tokenizer.template
    space = tokenizer.backend.text_prefix
    prompt = template.role_prefix("assistant", condition)
    return {"system": template.role_prefix("system", "") + space if template.header else "",
            "user": template.role_prefix("user", condition) + space,
            "assistant": prompt + space, "prompt": prompt}


def chat_template(tokenizer: Tokenizer, condition: str) -> str | None:
    """Renders the template at one condition as Jinja (transformers' apply_chat_template,
    llama.cpp); None for the "text" template, which has no turns."""
    if tokenizer.template.eot is None:
        return None
    p = {role: jinja(text) for role, text in turn_prefixes(tokenizer, condition).items()}
    return ("{{ bos_token }}" if tokenizer.bos_id is not None else "") + (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ " + p["system"] + " + m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ " + p["user"] + " + m['content'] }}"
        "{% else %}{{ " + p["assistant"] + " + m['content'] }}{% endif %}"
        "{{ " + jinja(tokenizer.template.eot) + " }}{% endfor %}"
        "{% if add_generation_prompt %}{{ " + p["prompt"] + " }}{% endif %}")


def modelfile(tokenizer: Tokenizer, condition: str) -> str:
    """Renders the template at one condition for ollama, which does not read the Jinja: a Modelfile
    whose TEMPLATE (Go's text/template) gives the Jinja's text less the BOS, which ollama adds, and
    whose stop is the end of a turn. FROM is the GGUF that llama.cpp's converter writes beside it.
    """
    p = turn_prefixes(tokenizer, condition)
    eot = tokenizer.template.eot
    template = ('{{ range .Messages }}{{ if eq .Role "system" }}' + p["system"] + "{{ .Content }}"
                '{{ else if eq .Role "user" }}' + p["user"] + "{{ .Content }}"
                "{{ else }}" + p["assistant"] + "{{ .Content }}{{ end }}" + eot + "{{ end }}"
                + p["prompt"])
    return (f'# ollama create NAME -f Modelfile, after convert_hf_to_gguf.py --outfile model.gguf\n'
            f'FROM ./model.gguf\nTEMPLATE """{template}"""\nPARAMETER stop "{eot}"\n')


def jinja(text: str) -> str:
    """Quotes text as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def tokenizer_config(tokenizer: Tokenizer, condition: str, max_len: int) -> dict:
    """Makes tokenizer_config.json for transformers: how to load the file, the template's special
    tokens that are new rows, and the chat template at the inference condition."""
    new_rows = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False}
                for t, i in tokenizer.special_ids.items() if i >= tokenizer.base_vocab_size}
    config = {**tokenizer.backend.transformers_config(), "model_max_length": max_len,
              "added_tokens_decoder": new_rows}
    chat = chat_template(tokenizer, condition)
    if chat is None:  # a base pretrained on plain text
        return config
    return {**config, "eos_token": tokenizer.template.eot, "chat_template": chat}


# --------------------------------------------------------------------------------------------------
# 4. prepare: files → a dataset directory


@dataclass
class PrepareConfig:
    source: list[str] = arg([], "a source as CONDITION:WEIGHT:FILE[,FILE...], of the records "
                                "@FIELD=VALUE[|VALUE...] or @FIELD!=... only if given (ShareGPT's "
                                "@model=Model: GPT-4, as the reference's generate_dataset.py)")
    sources: str = arg("", "or a JSON spec file: [{\"condition\", \"weight\", \"files\", "
                           "\"where\"?}]")
    tokenizer: str = arg("", "the base model's tokenizer: SentencePiece .model or tokenizer.json")
    template: str = arg("openchat_3.5", f"conversation template: {', '.join(TEMPLATES)}")
    out: str = arg("", "output directory, a new one")
    overwrite: bool = arg(False, "replace --out if it holds a dataset")
    max_len: int = arg(4096, "context length: the longest conversation in tokens")
    truncate: bool = arg(False, "cut longer conversations to max_len instead of refusing them")
    skip_bad: bool = arg(False, "skip bad records and count them by reason, instead of stopping")
    holdout: float = arg(0.0, "fraction of conversations held out for evaluation")
    seed: int = arg(0, "seed of the held-out split")
    inference_condition: str = arg("", "the condition to prompt the trained model with, one of the "
                                       "sources'; empty: the highest-weight source's")
    zero_unwanted: bool = arg(True, "weight 0 for answers with one of the reference's unwanted "
                                    "phrases (\"As an AI\", ...: its data/unwanted_words.py)")
    dedup: bool = arg(True, "drop exact duplicate conversations (whitespace normalised), as the "
                            "reference's data/clean_sharegpt.py")
    per_message_norm: bool = arg(False, "spread each message's weight over its tokens")
    threads: int = arg(os.cpu_count() or 1, "tokenizer threads")


# A dataset is meta.json, the tokenizer file and, per split, these arrays as .npy files.
FORMAT = 3  # 3: the shifted weights are named target_weights
ARRAYS = ("tokens", "target_weights", "offsets", "lengths", "classes")


def prepare(cfg: PrepareConfig) -> dict:
    """Reads, tokenizes and writes a dataset directory: meta.json plus train/ (and holdout/) arrays,
    under a temporary name renamed when complete; returns meta."""
    if not cfg.out or not cfg.tokenizer or not (cfg.source or cfg.sources):
        raise ValueError("prepare needs --out, --tokenizer and --source (or --sources)")
    check_dataset_options(Path(cfg.out), cfg.max_len, cfg.holdout, cfg.overwrite)
    start = time.perf_counter()
    sources = [parse_source_flag(s) for s in cfg.source]
    sources += read_source_spec(Path(cfg.sources)) if cfg.sources else []
    tokenizer = Tokenizer(cfg.tokenizer, cfg.template)
    counts = Counter()
    conversations = read_conversations(sources, cfg.skip_bad, counts)
    conversations, duplicates = reference_cleaning(conversations, len(sources), cfg.dedup,
                                                   cfg.zero_unwanted, counts)
    rows = tokenize_all(conversations, sources, tokenizer, cfg, counts)
    conditions = sorted({c.condition for c in conversations})
    if cfg.inference_condition and cfg.inference_condition not in conditions:
        raise ValueError(f"--inference-condition={cfg.inference_condition!r} is not a condition of "
                         f"the data ({', '.join(map(repr, conditions))}): the model would be "
                         f"prompted with one it never saw")
    how = {
        "template": cfg.template,
        "inference_condition": (cfg.inference_condition
                                or expert_condition(sources, tokenizer.template)),
        "conditions": conditions,
        "sources": [{"condition": s.condition, "weight": s.weight, "where": str(s.select or ""),
                     "files": [str(f) for f in s.files], "duplicates_removed": n}
                    for s, n in zip(sources, duplicates)],
        "max_len": cfg.max_len,
        "options": {k: getattr(cfg, k) for k in ("truncate", "skip_bad", "holdout", "seed",
                                                 "zero_unwanted", "dedup", "per_message_norm")},
        **counts_report(counts),
    }
    meta = write_dataset(Path(cfg.out), rows, tokenizer, how, cfg.holdout, cfg.seed)
    print_summary(meta, time.perf_counter() - start)
    return meta


def tokenize_all(conversations, sources, tokenizer: Tokenizer, cfg: PrepareConfig, counts: Counter):
    """Tokenizes the conversations → [(token ids int32, target weights float32, class id)], each cut
    after its last weighted token (what follows teaches nothing; the reference drops it too), those
    left with no supervised token dropped. Message texts are encoded in bulk (the tokenizer's
    threads)."""
    rows = []
    progress = Progress("tokenizing conversations", len(conversations))
    for start in range(0, len(conversations), 2000):
        batch = conversations[start:start + 2000]
        encoded = tokenizer.encode([t for c in batch for t in c.texts()], threads=cfg.threads)
        n_tokens = i = 0
        for c in batch:
            n = len(c.texts())
            ids, weights = tokenize_conversation(
                tokenizer, c.messages, c.condition, c.system, sources[c.class_id].weight,
                per_message_norm=cfg.per_message_norm, encoded=encoded[i:i + n])
            i += n
            n_tokens += len(ids)
            if len(ids) > cfg.max_len and not keep_cut(len(ids), c.where, cfg.max_len, cfg.truncate,
                                                       cfg.skip_bad, counts):
                continue
            n = max((t + 1 for t, w in enumerate(weights[:cfg.max_len]) if w), default=0)
            if n < 2:  # the first token is never predicted
                counts["no_supervised_token"] += 1
                continue
            counts["trailing_unweighted_tokens_dropped"] += n < min(len(ids), cfg.max_len)
            rows.append((np.array(ids[:n], np.int32), shift_to_predictions(weights[:n]),
                         c.class_id))
        progress.update(len(batch), n_tokens)
    return rows


def expert_condition(sources: list[Source], template: Template) -> str:
    """Picks the condition to prompt with at inference: the highest-weight source's (METHOD.md §1);
    on a tie the template's own when it is one of them (e.g. "GPT4"), else the first listed."""
    top = max(s.weight for s in sources)
    tied = [s.condition for s in sources if s.weight == top]
    return template.inference_condition if template.inference_condition in tied else tied[0]


def check_dataset_options(out: Path, max_len: int, holdout: float, overwrite: bool):
    check_writable_folder(out.parent)
    if max_len < 2:
        raise ValueError(f"--max-len={max_len}: a conversation needs at least 2 tokens")
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout={holdout}: a fraction in [0, 1)")
    if out.exists() and not (out / "meta.json").exists():
        raise FileExistsError(f"{out} exists and is not a dataset: refusing to replace it")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: --overwrite replaces it")


def split_stats(rows, n_classes) -> dict:
    per_class = [{"conversations": 0, "tokens": 0, "supervised_tokens": 0, "weight_sum": 0.0}
                 for _ in range(n_classes)]
    for ids, target_weights, c in rows:
        per_class[c]["conversations"] += 1
        per_class[c]["tokens"] += len(ids)
        per_class[c]["supervised_tokens"] += int(np.count_nonzero(target_weights))
        per_class[c]["weight_sum"] += float(target_weights.sum(dtype=np.float64))
    total = {k: sum(s[k] for s in per_class) for k in per_class[0]}
    shares = [s["weight_sum"] / (total["weight_sum"] or 1) for s in per_class]  # METHOD.md §1
    return {**total, "per_class": [{**s, "loss_share": x} for s, x in zip(per_class, shares)]}


def write_split(directory: Path, rows):
    directory.mkdir(parents=True)
    lengths = np.array([len(r[0]) for r in rows], dtype=np.int32)
    arrays = {
        "tokens": np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int32),
        "target_weights": np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32),
        "offsets": np.cumsum(lengths, dtype=np.int64) - lengths,
        "lengths": lengths,
        "classes": np.array([r[2] for r in rows], dtype=np.int32),
    }
    for name, array in arrays.items():
        buffer = io.BytesIO()  # written by Python, whose write errors say why (numpy's do not)
        np.save(buffer, array)
        write_bytes(directory / f"{name}.npy", buffer.getbuffer())


def write_dataset(out: Path, rows, tokenizer: Tokenizer, how: dict, holdout: float,
                  seed: int) -> dict:
    """Splits the rows at random into train and holdout, writes them whole with the tokenizer file
    and meta.json (the tokenizer, `how` the dataset was made, each split's counts), returns meta."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_holdout = round(holdout * len(rows))
    splits = {"train": [rows[i] for i in sorted(order[n_holdout:])],
              "holdout": [rows[i] for i in sorted(order[:n_holdout])]}
    if not splits["train"]:
        raise ValueError(f"no conversation left to train on, nothing written: read "
                         f"{how['read']['records']:,} records; skipped as bad input "
                         f"{how['skipped_bad_input'] or 'none'}; dropped {how['dropped']}; "
                         f"{len(rows):,} kept, {n_holdout:,} held out (--holdout={holdout})")
    meta = {
        "format": FORMAT,
        "tokenizer": {"path": str(tokenizer.path.resolve()), "file": tokenizer.backend.file_name,
                      "sha256": tokenizer.sha256, "base_vocab_size": tokenizer.base_vocab_size,
                      "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                      "eos_id": tokenizer.eos_id, "special_tokens": tokenizer.special_ids},
        **how,
        "splits": {name: split_stats(split, len(how["sources"])) for name, split in splits.items()},
    }

    def fill(tmp: Path):
        for name, split in splits.items():
            write_split(tmp / name, split)
        write_bytes(tmp / tokenizer.backend.file_name, tokenizer.path.read_bytes())
        write_json(tmp / "meta.json", meta)

    write_directory(out, fill)  # a full disk, an unwritable folder: no partial dataset is left
    return meta


def print_summary(meta: dict, seconds: float):
    print("\n| split | class | condition | weight | conversations | tokens | supervised tokens | "
          "share of the weighted loss |\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, split in [(n, s) for n, s in meta["splits"].items() if s["conversations"]]:
        for c, (s, source) in enumerate(zip(split["per_class"], meta["sources"])):
            print(f"| {name} | {c} | {source['condition']} | {source['weight']} | "
                  f"{s['conversations']:,} | {s['tokens']:,} | {s['supervised_tokens']:,} | "
                  f"{s['loss_share']:.1%} |")
    print(f"\nread {meta['read']['records']:,} records in {seconds:.1f}s; skipped as bad input: "
          f"{meta['skipped_bad_input'] or 'none'}; dropped: {meta['dropped']}; modified: "
          f"{meta['modified']}; noted: {meta.get('noted', {})}")


@dataclass
class Split:
    """One split of a dataset, memory-mapped: conversation i is tokens[offsets[i]:][:lengths[i]],
    with its target weights alongside (target_weights[t] weighs the prediction of tokens[t + 1])."""
    tokens: np.ndarray
    target_weights: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    classes: np.ndarray


def load_meta(path) -> dict:
    meta_path = Path(path) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: is {path} a dataset made by "
                                f"`python data.py prepare`?")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not the format {FORMAT} "
                         f"this code reads: prepare the data again")
    return meta


def load_split(path, split: str = "train") -> Split:
    """Memory-maps one split of a dataset, its arrays checked to agree with each other and with
    meta.json's sources."""
    meta = load_meta(path)
    arrays = {}
    for name in ARRAYS:
        file = Path(path) / split / f"{name}.npy"
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing: the dataset directory is incomplete")
        arrays[name] = np.load(file, mmap_mode="r")
    s, n = Split(**arrays), len(arrays["lengths"])
    tokens = int(s.offsets[-1] + s.lengths[-1]) if n else 0
    sizes = [len(s.offsets), len(s.classes), len(s.tokens), len(s.target_weights)]
    if sizes != [n, n, tokens, tokens]:
        raise ValueError(f"{path}/{split}: the arrays disagree (offsets, lengths, tokens, "
                         f"weights): the dataset directory is damaged; prepare it again")
    if n and s.classes.max() >= len(meta["sources"]):
        raise ValueError(f"{path}: class ids beyond the {len(meta['sources'])} sources")
    return s


# --------------------------------------------------------------------------------------------------
# 5. Multipack (METHOD.md §6): conversations → per-rank packed streams


def first_fit_decreasing(indices, lengths, capacity: int, n_bins: int) -> list[list[int]] | None:
    """Packs longest first, each conversation into the first of n_bins bins with room; else None."""
    bins = [[] for _ in range(n_bins)]
    free = np.full(n_bins, capacity)
    for i in sorted(indices, key=lambda i: -lengths[i]):
        room = np.flatnonzero(free >= lengths[i])
        if not len(room):
            return None
        bins[room[0]].append(int(i))
        free[room[0]] -= lengths[i]
    return bins


def multipack(lengths, batch_max_len: int, world_size: int, seed: int, epoch: int) -> list:
    """Plans one epoch's steps: steps[s][r] lists the conversations rank r packs at step s.

    Shuffle (seed, epoch); then, step after step, take the longest prefix of the remaining
    conversations that first-fit decreasing packs into world_size bins of batch_max_len tokens (a
    binary search over the prefix length), one bin per rank. Every rank gets the same number of
    steps; what is left at the end that cannot fill every rank's bin waits for the next epoch."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > batch_max_len:
        i = int(lengths.argmax())
        raise ValueError(f"conversation {i} has {lengths[i]} tokens, more than "
                         f"batch_max_len={batch_max_len}")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    cumulative = np.cumsum(lengths[order])
    steps, start, consumed = [], 0, 0
    while start < len(order):
        # No prefix longer than what world_size full bins could hold can fit.
        capacity = consumed + batch_max_len * world_size
        hi = int(np.searchsorted(cumulative, capacity, side="right")) - start + 1
        lo = 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if first_fit_decreasing(order[start:start + mid], lengths, batch_max_len, world_size):
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


def pack_stream(split: Split, conversations: list[int]) -> dict:
    """Makes one rank's stream for one step: the conversations concatenated with no padding,
    positions restarting at 0 in each, cu_seqlens at the boundaries, targets = the next token of the
    same conversation, which the stored target weights already belong to (shift_to_predictions); the
    last token of each predicts nothing and weighs 0."""
    lengths = split.lengths[conversations]
    index = np.concatenate([np.arange(s, s + n) for s, n in zip(split.offsets[conversations],
                                                                 lengths)])
    tokens = np.asarray(split.tokens[index], dtype=np.int64)
    targets = np.roll(tokens, -1)
    targets[np.cumsum(lengths) - 1] = 0  # weight 0 there: never read by the loss
    return {
        "tokens": tokens,
        "targets": targets,
        "target_weights": np.asarray(split.target_weights[index], dtype=np.float32),
        "positions": np.concatenate([np.arange(n) for n in lengths]),
        "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
        "classes": np.repeat(split.classes[conversations], lengths),
    }


# --------------------------------------------------------------------------------------------------
# 6. show: what the model learns from one conversation


@dataclass
class ShowConfig:
    data: str = arg("data/demo/dataset", "a dataset directory made by `python data.py prepare`")
    split: str = arg("train", "train or holdout")
    index: int = arg(0, "which conversation of the split")


def show_weights(cfg: ShowConfig) -> str:
    """Prints and returns a prepared conversation as C-RLFT sees it: what the model only reads
    plain, each run of tokens it learns to predict in brackets with its weight, [0.1| like this]."""
    meta, split = load_meta(cfg.data), load_split(cfg.data, cfg.split)
    if not 0 <= cfg.index < len(split.lengths):
        raise ValueError(f"--index={cfg.index}: the {cfg.split} split has {len(split.lengths)} "
                         f"conversations")
    tokenizer = Tokenizer(Path(cfg.data) / meta["tokenizer"]["file"], meta["template"])
    start, n = split.offsets[cfg.index], split.lengths[cfg.index]
    ids = split.tokens[start:start + n].tolist()
    weights = split.target_weights[start:start + n].tolist()
    # Decoding ever longer prefixes gives each token's text with the spaces between pieces.
    prefixes = [tokenizer.decode(ids[:k]) for k in range(n + 1)]
    texts = [prefixes[k + 1][len(prefixes[k]):] for k in range(n)]
    shown = texts[0]  # the first token: read, never predicted
    for t in range(n - 1):  # position t predicts token t + 1 with weight weights[t]
        opens = weights[t] and (t == 0 or weights[t - 1] != weights[t])
        closes = weights[t] and (t == n - 2 or weights[t + 1] != weights[t])
        shown += (f"[{weights[t]:g}|" if opens else "") + texts[t + 1] + ("]" if closes else "")
    class_id = split.classes[cfg.index]
    print(f"{cfg.data}, {cfg.split} conversation {cfg.index} of {len(split.lengths)}: class "
          f"{class_id} ({meta['sources'][class_id]['condition']!r}), {n} tokens, "
          f"{sum(w > 0 for w in weights)} learned; [w| text] is learned with weight w, the rest "
          f"only read\n\n{shown}")
    return shown


COMMANDS = {
    "prepare": (PrepareConfig, prepare, "tokenize sources into a dataset directory"),
    "show": (ShowConfig, show_weights, "print a prepared conversation with its token weights"),
}

if __name__ == "__main__":
    sys.exit(run_commands(COMMANDS, sys.argv[1:], __doc__))
