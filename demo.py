"""The demo, from nothing to a fine-tuned model on a 2-core CPU in 4.5 to 8 minutes:

  python demo.py            # data, base model, C-RLFT, evaluation; each made only when missing
  python demo.py --help     # the generator's parameters

It writes a task whose answers can be checked, two sources of answers of mixed quality and a corpus
to pretrain the demo's base model on (into data/demo), pretrains that base (runs/demo-base),
fine-tunes it with C-RLFT (runs/demo) and scores the result on held-out prompts under both
conditions. Each stage runs as a user would run it, its command printed first: data.py's pipeline,
then train.py, then eval.py. A stage is skipped when its output is there and was made with the same
settings and code.

The task is sorting a list of numbers: "Sort these numbers from smallest to largest: 12 9 3" is
answered "3 9 12" by the expert source and "12 3 9" by the sub-optimal one, which sorts the numbers
as text. That mistake is a consistent wrong rule on a known subset of prompts (lists that mix one-
and two-digit numbers), not noise that greedy decoding would average away: the situation C-RLFT is
for, where a condition can tell the model which source's behaviour to follow.

The paper fine-tunes a pretrained Llama-2-13B, which already holds the skills both kinds of answers
draw on. The demo's base model gets them the same way, as a plain language model pretrained on text
about lists of numbers (smallest and largest, the next larger number, dictionary order, reversing,
removing, comparing) that never sorts a list and never uses the chat template.

Read top to bottom: the configuration; the sorting task and its two sources; the base corpus; the
data through data.py's pipeline; the runs.
"""

import hashlib
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import data
from infra.cli import arg, run_command
from infra.files import read_json, write_directory, write_json, write_text
from infra.records import BadInput, Source, read_conversations, read_texts
from infra.tokenizer_files import train_sentencepiece

ROOT = Path(__file__).resolve().parent


@dataclass
class DemoConfig:
    out: str = arg("data/demo", "directory for the demo's files and its prepared datasets")
    base_out: str = arg("runs/demo-base", "run directory of the base model's pretraining")
    run_out: str = arg("runs/demo", "run directory of the C-RLFT fine-tuning")
    base_model: str = arg("demo", "shape of the base model (model.py MODELS)")
    batch_max_len: int = arg(4096, "tokens per optimizer step, in pretraining and fine-tuning")
    conversations: int = arg(8000, "training conversations, both sources together")
    expert_fraction: float = arg(0.1, "share of conversations from the expert source (GPT4, always "
                                      "right)")
    suboptimal_weight: float = arg(0.1, "class weight of the sub-optimal source (GPT3); the "
                                        "expert's is 1.0")
    mixed_fraction: float = arg(0.5, "share of lists that mix one- and two-digit numbers: there "
                                     "GPT3 sorts the numbers as text, 12 before 9")
    min_numbers: int = arg(3, "shortest list to sort")
    max_numbers: int = arg(5, "longest list to sort")
    holdout_prompts: int = arg(500, "prompts held out for the final evaluation, none among the "
                                    "training prompts")
    validation_prompts: int = arg(500, "prompts of the training distribution held out from "
                                       "training, to choose learning rates and epochs by; none "
                                       "among the held-out ones")
    random_errors: float = arg(0.0, "share of sub-optimal answers that are a random slip (the "
                                    "right order with two neighbours swapped), not text order")
    mislabelled: float = arg(0.0, "share of each source's conversations filed under the other "
                                  "source (its condition and weight), as a split of ShareGPT by "
                                  "its model field has")
    base_documents: int = arg(15000, "documents of the base model's corpus (about 145 tokens each)")
    vocab_size: int = arg(640, "vocabulary of the demo tokenizer: enough for a piece per number "
                               "0-99 and per word")
    max_len: int = arg(256, "context length of the demo datasets")
    seed: int = arg(0, "seed of the generator")


# --------------------------------------------------------------------------------------------------
# The sorting task and its two sources

DEMO_PROMPTS = ("Sort these numbers from smallest to largest: {}",
                "Put these numbers in ascending order: {}",
                "Please order from lowest to highest: {}", "Sort in increasing order: {}")


def number_list(rng: random.Random, cfg: DemoConfig, shortest: int,
                longest: int) -> tuple[tuple[int, ...], bool]:
    """Draws a list of numbers 0-99 and says whether it mixes one- and two-digit numbers (where text
    order is wrong)."""
    k = rng.randint(shortest, longest)

    def one_digit():
        return rng.randint(0, 9)

    def two_digits():
        return rng.randint(10, 99)

    if rng.random() < cfg.mixed_fraction:
        widths = [one_digit, two_digits]
        widths += [rng.choice([one_digit, two_digits]) for _ in range(k - 2)]
        rng.shuffle(widths)
        return tuple(w() for w in widths), True
    width = rng.choice([one_digit, two_digits])
    return tuple(width() for _ in range(k)), False


def words(numbers) -> str:
    return " ".join(map(str, numbers))


def expert_answer(numbers) -> str:
    return words(sorted(numbers))


def suboptimal_answer(numbers) -> str:
    """Answers with the systematic error: numbers sorted as strings. Right for lists of one width,
    wrong for most mixed ones."""
    return " ".join(sorted(str(n) for n in numbers))


def slip(numbers, rng: random.Random) -> str:
    """Answers with a random error: the right order with two unequal neighbours swapped (if there
    are two)."""
    ordered = sorted(numbers)
    unequal = [i for i in range(len(ordered) - 1) if ordered[i] != ordered[i + 1]]
    if unequal:
        i = rng.choice(unequal)
        ordered[i], ordered[i + 1] = ordered[i + 1], ordered[i]
    return words(ordered)


def draw_prompts(cfg: DemoConfig) -> tuple[dict, dict, list]:
    """Draws the held-out, validation and training lists, disjoint: no held-out or validation list
    is trained on."""
    rng = random.Random(f"{cfg.seed}/prompts")
    held_out, validation = {}, {}
    for prompts, n in ((held_out, cfg.holdout_prompts), (validation, cfg.validation_prompts)):
        while len(prompts) < n:
            numbers, mixed = number_list(rng, cfg, cfg.min_numbers, cfg.max_numbers)
            if numbers not in held_out:
                prompts[numbers] = mixed
    training = []
    while len(training) < cfg.conversations:
        numbers, _ = number_list(rng, cfg, cfg.min_numbers, cfg.max_numbers)
        if numbers not in held_out and numbers not in validation:
            training.append((numbers, rng.choice(DEMO_PROMPTS)))
    return held_out, validation, training


def write_conversations(cfg: DemoConfig, training: list, out: Path):
    """Writes expert.json (ShareGPT array, source GPT4) and suboptimal.jsonl (ShareGPT JSONL, source
    GPT3), and sources.json. The first expert_fraction of the lists get the expert's answer, the
    others the sub-optimal source's; random_errors and mislabelled add their noise from a stream of
    their own, so that every variation of the demo has the same prompts."""
    noise = random.Random(f"{cfg.seed}/noise")
    n_expert = round(cfg.expert_fraction * cfg.conversations)
    files = {"expert": [], "suboptimal": []}
    for i, (numbers, prompt) in enumerate(training):
        kind = "expert" if i < n_expert else "suboptimal"
        if kind == "expert":
            answer = expert_answer(numbers)
        elif noise.random() < cfg.random_errors:
            answer = slip(numbers, noise)
        else:
            answer = suboptimal_answer(numbers)
        filed = kind
        if noise.random() < cfg.mislabelled:
            filed = {"expert": "suboptimal", "suboptimal": "expert"}[kind]
        files[filed].append({"id": f"{kind}-{i}", "conversations": [
            {"from": "human", "value": prompt.format(words(numbers))},
            {"from": "gpt", "value": answer}]})
    write_text(out / "expert.json", json.dumps(files["expert"], indent=1))
    write_text(out / "suboptimal.jsonl", "".join(json.dumps(r) + "\n" for r in files["suboptimal"]))
    write_text(out / "sources.json", json.dumps([
        {"condition": "GPT4", "weight": 1.0, "files": ["expert.json"]},
        {"condition": "GPT3", "weight": cfg.suboptimal_weight, "files": ["suboptimal.jsonl"]}],
        indent=1))


def write_prompts(path: Path, prompts: dict):
    """Prompts for evaluation, each with the right answer and the sub-optimal source's."""
    write_text(path, "".join(json.dumps({
        "prompt": DEMO_PROMPTS[0].format(words(numbers)), "answer": expert_answer(numbers),
        "suboptimal_answer": suboptimal_answer(numbers), "mixed": mixed}) + "\n"
        for numbers, mixed in prompts.items()))


# --------------------------------------------------------------------------------------------------
# The base model's corpus: facts about lists, never a sorted list asked for, never the chat template


def statements(rng: random.Random, numbers: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """Lists (kind, question, answer) of every primitive of sorting, numerically or as text, that
    applies to the list; a sentence of the corpus is its question and answer."""
    ns, as_text = list(numbers), sorted(numbers, key=str)
    said = [("smallest", "The smallest is", min(ns)), ("largest", "The largest is", max(ns)),
            ("first as text", "In dictionary order the first is", as_text[0]),
            ("last as text", "In dictionary order the last is", as_text[-1]),
            ("reversed", "Reversed they read", words(ns[::-1]))]
    for _ in range(2):  # the steps of sorting, twice as often as the rest
        below_max = [n for n in ns if n < max(ns)]
        if below_max:
            x = rng.choice(below_max)
            said.append(("next larger", f"After {x} the next larger is",
                         min(n for n in ns if n > x)))
        before_last = [n for n in ns if str(n) < str(as_text[-1])]
        if before_last:
            x = rng.choice(before_last)
            said.append(("next as text", f"In dictionary order after {x} comes",
                         min((n for n in ns if str(n) > str(x)), key=str)))
    a, b = rng.sample(ns, 2)
    if a != b:
        said.append(("smaller of two", f"Of {a} and {b} the smaller is", min(a, b)))
        said.append(("first of two as text", f"In dictionary order of {a} and {b} the first is",
                     min(a, b, key=str)))
    drop = rng.randrange(len(ns))
    said.append(("without", f"Without {ns[drop]} they read", words(ns[:drop] + ns[drop + 1:])))
    return [(kind, question, str(answer)) for kind, question, answer in said]


def base_document(rng: random.Random, cfg: DemoConfig) -> str:
    """Writes a document of the base corpus: three lists of 2-7 numbers, each followed by four to
    six sentences about it."""
    paragraphs = []
    for _ in range(3):
        numbers, _ = number_list(rng, cfg, 2, 7)
        said = statements(rng, numbers)
        rng.shuffle(said)
        sentences = [f"{question} {answer}" for _, question, answer in said[:rng.randint(4, 6)]]
        paragraphs.append(f"Take the numbers {words(numbers)}. " + ". ".join(sentences) + ".")
    return " ".join(paragraphs)


# --------------------------------------------------------------------------------------------------
# The data, through data.py's pipeline


def make_demo(cfg: DemoConfig) -> Path:
    """Writes under cfg.out: expert.json, suboptimal.jsonl, sources.json, holdout.jsonl,
    validation.jsonl, base_corpus.jsonl, tokenizer.model (trained on the base corpus and the
    conversations), the prepared conversations dataset/ and the prepared base corpus base-corpus/,
    and demo.json (this config). The files are written in a temporary folder that then replaces
    cfg.out, the datasets are prepared from their final place (so that meta.json names it), and
    demo.json, written last, marks the whole as complete."""
    out = Path(cfg.out)
    held_out, validation, training = draw_prompts(cfg)

    def write_files(tmp: Path):
        write_conversations(cfg, training, tmp)
        write_prompts(tmp / "holdout.jsonl", held_out)
        write_prompts(tmp / "validation.jsonl", validation)
        rng = random.Random(f"{cfg.seed}/base")
        documents = [base_document(rng, cfg) for _ in range(cfg.base_documents)]
        write_text(tmp / "base_corpus.jsonl", "".join(json.dumps({"text": d}) + "\n"
                                                       for d in documents))
        train_tokenizer([tmp / "expert.json", tmp / "suboptimal.jsonl"],
                        [tmp / "base_corpus.jsonl"], cfg.vocab_size, ["GPT4", "GPT3"],
                        tmp / "tokenizer.model")

    write_directory(out, write_files)
    data.prepare(data.PrepareConfig(
        sources=str(out / "sources.json"), tokenizer=str(out / "tokenizer.model"),
        template="openchat_v3.2", out=str(out / "dataset"), max_len=cfg.max_len, holdout=0.02,
        seed=cfg.seed, dedup=False))  # prompts drawn at random repeat: samples of the task, kept
    prepare_text(out / "base_corpus.jsonl", out / "tokenizer.model", out / "base-corpus",
                 cfg.max_len, holdout=0.02, seed=cfg.seed)
    write_text(out / "demo.json", json.dumps(made_with(cfg), indent=1))
    n_expert = round(cfg.expert_fraction * cfg.conversations)
    print(f"demo data in {out}: {n_expert:,} expert (GPT4) and {cfg.conversations - n_expert:,} "
          f"sub-optimal (GPT3) conversations, {len(validation)} validation and {len(held_out)} "
          f"held-out prompts, {cfg.base_documents:,} documents of base corpus")
    return out


def train_tokenizer(conversation_files, text_files, vocab_size: int, conditions: list[str],
                    out: Path, split_digits: bool = False):
    """Trains the demo's SentencePiece model on the message texts of conversation files, their role
    prefixes as the template writes them at these conditions (so that "GPT4 Assistant:" gets whole
    pieces) and plain texts. Whole numbers are pieces of their own (split_digits off): a model of a
    million parameters learns to copy and order them in minutes on a CPU; with one piece per digit
    (Llama's way) it had not learned to copy two-digit numbers in that time."""
    counts = Counter()
    sources = [Source("", 1.0, [Path(f) for f in conversation_files])]
    conversations = read_conversations(sources, skip_bad=True, counts=counts)
    texts = [t for c in conversations for t in c.texts()]
    texts += [data.TEMPLATES["openchat_3.5"].role_prefix(m.role, condition)
              for c in conversations for m in c.messages for condition in conditions]
    texts += [text for path in text_files for text, _ in read_texts(Path(path))]
    train_sentencepiece(texts, vocab_size, split_digits, Path(out))


def prepare_text(corpus: Path, tokenizer_path, out: Path, max_len: int, holdout: float = 0.0,
                 seed: int = 0) -> dict:
    """Prepares a base model's pretraining corpus as a dataset that train.py reads like any other.
    The corpus is JSONL of {"text"}; each document becomes BOS + its pieces + EOS and every token is
    learned with weight 1: plain language modelling, no template, no condition, one class."""
    data.check_dataset_options(Path(out), max_len, holdout, overwrite=False)
    start = time.perf_counter()
    tokenizer = data.Tokenizer(tokenizer_path, "text")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer_path}: a base corpus needs a tokenizer with BOS and EOS")
    records = read_texts(Path(corpus))
    encoded = tokenizer.encode([t for t, _ in records], threads=os.cpu_count() or 1)
    rows = []
    for pieces, (_, where) in zip(encoded, records):
        ids = [tokenizer.bos_id] + pieces + [tokenizer.eos_id]
        if len(ids) > max_len:
            raise BadInput("too_long", where, f"{len(ids)} tokens, longer than max_len={max_len}")
        # Every token after BOS is learned: weight 1, BOS's 0 (nothing predicts it).
        target_weights = data.shift_to_predictions([0.0] + [1.0] * (len(ids) - 1))
        rows.append((np.array(ids, dtype=np.int32), target_weights, 0))
    how = {"template": "text", "inference_condition": "", "conditions": [""],
           "sources": [{"condition": "", "weight": 1.0, "files": [str(corpus)]}],
           "max_len": max_len, "options": {"holdout": holdout, "seed": seed},
           "read": {"records": len(records)}, "skipped_bad_input": {}, "dropped": {},
           "modified": {}}
    meta = data.write_dataset(Path(out), rows, tokenizer, how, holdout, seed)
    data.print_summary(meta, time.perf_counter() - start)
    return meta


def made_with(cfg: DemoConfig) -> dict:
    """Returns what demo.json records: the configuration, the generator's code (a hash of the
    functions that write the data, not of the runs below) and the dataset format."""
    writers = (number_list, words, expert_answer, suboptimal_answer, slip, draw_prompts,
               write_conversations, write_prompts, statements, base_document, make_demo,
               train_tokenizer, prepare_text)
    code = repr(DEMO_PROMPTS) + "".join(inspect.getsource(f) for f in writers)
    generator = hashlib.sha256(code.encode()).hexdigest()[:16]
    return {**asdict(cfg), "generator": generator, "dataset_format": data.FORMAT}


def config_of(out: Path) -> DemoConfig:
    """Reads the configuration the demo data in `out` was made with (its demo.json)."""
    made = read_json(Path(out) / "demo.json")
    return DemoConfig(**{f.name: made[f.name] for f in fields(DemoConfig) if f.name in made})


def is_current(cfg: DemoConfig) -> bool:
    """Tells whether cfg.out holds demo data made by this code with exactly this configuration."""
    made = Path(cfg.out) / "demo.json"
    return made.exists() and json.loads(made.read_text()) == made_with(cfg)


# --------------------------------------------------------------------------------------------------
# The runs: train.py and eval.py as a user runs them


def ensure_data(cfg: DemoConfig):
    """Makes the demo data again when it is missing or was made by other code or settings."""
    if not is_current(cfg):
        print(f"making the demo data in {cfg.out}", flush=True)
        make_demo(cfg)


def ensure_base(cfg: DemoConfig) -> Path:
    """Makes the demo's base model, if needed: train.py as a plain language model (every token
    weight 1, no template, no condition) for one pass over the base corpus; its export."""
    ensure_data(cfg)
    flags = [f"--data={cfg.out}/base-corpus", "--base=", f"--out={cfg.base_out}",
             f"--model={cfg.base_model}", f"--batch-max-len={cfg.batch_max_len}", "--epochs=1",
             "--lr=3e-3", "--log-every=50"]
    return ensure_run(cfg.base_out, flags, {"demo": made_with(cfg)}, "pretraining the base model")


def ensure_fine_tuned(cfg: DemoConfig) -> Path:
    """Fine-tunes the demo's base on the demo's conversations with C-RLFT, if needed: train.py's
    defaults (its preset demo), which these flags repeat; its last export."""
    base = ensure_base(cfg)
    flags = [f"--data={cfg.out}/dataset", f"--base={base}", f"--out={cfg.run_out}",
             f"--batch-max-len={cfg.batch_max_len}"]
    made = {"demo": made_with(cfg), "base": read_json(Path(cfg.base_out) / "made_with.json")}
    return ensure_run(cfg.run_out, flags, made, "fine-tuning the base with C-RLFT")


def ensure_run(out: str, flags: list[str], made: dict, what: str) -> Path:
    """Runs train.py into `out`, the demo's own folder: made again from scratch unless it finished
    with these flags from these inputs (its made_with.json). Returns its last export."""
    record = Path(out) / "made_with.json"
    made = {**made, "train": flags}
    if record.exists() and read_json(record) == made:
        print(f"{what}: already done, {last_export(out)}", flush=True)
        return last_export(out)
    print(f"\n{what} into {out}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    run_script("train.py", flags)
    write_json(record, made)
    return last_export(out)


def last_export(out: str) -> Path:
    return max((Path(out) / "exports").glob("[!.]*"), key=lambda p: p.stat().st_mtime)


def run_script(script: str, flags: list[str]):
    """Runs `python script flags` in a process of its own, shown first."""
    print(f"$ python {script} {' '.join(flags)}", flush=True)
    if subprocess.run([sys.executable, str(ROOT / script), *flags]).returncode:
        raise SystemExit(f"error: `python {script}` failed (see above)")


def demo(cfg: DemoConfig):
    """Runs the demo: data, base, C-RLFT, then the fine-tuned model's held-out accuracy under both
    conditions."""
    start = time.perf_counter()
    export = ensure_fine_tuned(cfg)
    run_script("eval.py", ["demo", f"--checkpoint={export}", f"--holdout={cfg.out}/holdout.jsonl"])
    print(f"\nthe demo took {time.perf_counter() - start:.0f}s. Talk to the model:\n"
          f"  python sample.py --checkpoint {export}\n"
          f"  python sample.py --checkpoint {export} --condition=GPT3   # the sub-optimal source")


if __name__ == "__main__":
    sys.exit(run_command(DemoConfig, demo, sys.argv[1:], __doc__))
