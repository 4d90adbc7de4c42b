"""The demo: a task whose answers can be checked, two sources of answers of mixed quality, and a corpus to
pretrain the demo's base model on. `python demo.py` writes them and runs them through data.py's pipeline.

The task is sorting a list of numbers: "Sort these numbers from smallest to largest: 12 9 3" is answered
"3 9 12" by the expert source and "12 3 9" by the sub-optimal one, which sorts the numbers as text. That
mistake is a consistent wrong rule on a known subset of prompts (lists that mix one- and two-digit numbers),
not noise that greedy decoding would average away: the situation C-RLFT is for, where a condition can tell
the model which source's behaviour to follow.

The paper fine-tunes a pretrained Llama-2-13B, which already holds the skills both kinds of answers draw
on. The demo's base model gets them the same way, as a plain language model pretrained on text about lists
of numbers (smallest and largest, the next larger number, dictionary order, reversing, removing, comparing)
that never sorts a list and never uses the chat template. train.py pretrains it (its preset demo-base).

Read top to bottom: the configuration, the sorting task and its two sources, the base corpus, make_demo.
"""

import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import data
from cli import arg, parse
from files import replace_directory, write_text


@dataclass
class DemoConfig:
    out: str = arg("data/demo", "directory for the demo's files and its prepared datasets")
    conversations: int = arg(8000, "training conversations, both sources together")
    expert_fraction: float = arg(0.1, "share of conversations from the expert source (GPT4, always right)")
    suboptimal_weight: float = arg(0.1, "class weight of the sub-optimal source (GPT3); the expert's is 1.0")
    mixed_fraction: float = arg(0.5, "share of lists that mix one- and two-digit numbers: there GPT3 sorts "
                                     "the numbers as text, 12 before 9")
    min_numbers: int = arg(3, "shortest list to sort")
    max_numbers: int = arg(5, "longest list to sort")
    holdout_prompts: int = arg(500, "prompts held out for the final evaluation, none among the training prompts")
    validation_prompts: int = arg(500, "prompts of the training distribution held out from training, to choose "
                                       "learning rates and epochs by; none among the held-out ones")
    random_errors: float = arg(0.0, "share of sub-optimal answers that are a random slip (the right order with "
                                    "two neighbours swapped) instead of text order")
    mislabelled: float = arg(0.0, "share of each source's conversations filed under the other source (its "
                                  "condition and weight), as a split of ShareGPT by its model field has")
    base_documents: int = arg(15000, "documents of the base model's corpus (about 145 tokens each)")
    vocab_size: int = arg(640, "vocabulary of the demo tokenizer: enough for a piece per number 0-99 and per word")
    max_len: int = arg(256, "context length of the demo datasets")
    seed: int = arg(0, "seed of the generator")


# ---------------------------------------------------------------------------------------------------------
# The sorting task and its two sources

DEMO_PROMPTS = ("Sort these numbers from smallest to largest: {}", "Put these numbers in ascending order: {}",
                "Please order from lowest to highest: {}", "Sort in increasing order: {}")


def number_list(rng: random.Random, cfg: DemoConfig, shortest: int, longest: int) -> tuple[tuple[int, ...], bool]:
    """A list of numbers 0-99 and whether it mixes one- and two-digit numbers (where text order is wrong)."""
    k = rng.randint(shortest, longest)
    one_digit, two_digits = (lambda: rng.randint(0, 9)), (lambda: rng.randint(10, 99))
    if rng.random() < cfg.mixed_fraction:
        widths = [one_digit, two_digits] + [rng.choice([one_digit, two_digits]) for _ in range(k - 2)]
        rng.shuffle(widths)
        return tuple(w() for w in widths), True
    width = rng.choice([one_digit, two_digits])
    return tuple(width() for _ in range(k)), False


def words(numbers) -> str:
    return " ".join(map(str, numbers))


def expert_answer(numbers) -> str:
    return words(sorted(numbers))


def suboptimal_answer(numbers) -> str:
    """The systematic error: numbers sorted as strings. Right for lists of one width, wrong for mixed."""
    return " ".join(sorted(str(n) for n in numbers))


def slip(numbers, rng: random.Random) -> str:
    """A random error: the right order with two unequal neighbours swapped (none in a list of one number)."""
    ordered = sorted(numbers)
    unequal = [i for i in range(len(ordered) - 1) if ordered[i] != ordered[i + 1]]
    if unequal:
        i = rng.choice(unequal)
        ordered[i], ordered[i + 1] = ordered[i + 1], ordered[i]
    return words(ordered)


def draw_prompts(cfg: DemoConfig) -> tuple[dict, dict, list]:
    """Held-out, validation and training lists, disjoint: no held-out or validation list is trained on."""
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
    """expert.json (ShareGPT array, source GPT4) and suboptimal.jsonl (ShareGPT JSONL, source GPT3), and
    sources.json. The first expert_fraction of the lists get the expert's answer, the others the sub-optimal
    source's; random_errors and mislabelled add their noise from a stream of their own, so that every
    variation of the demo has the same prompts."""
    noise = random.Random(f"{cfg.seed}/noise")
    n_expert = round(cfg.expert_fraction * cfg.conversations)
    files = {"expert": [], "suboptimal": []}
    for i, (numbers, prompt) in enumerate(training):
        kind = "expert" if i < n_expert else "suboptimal"
        if kind == "expert":
            answer = expert_answer(numbers)
        else:
            answer = slip(numbers, noise) if noise.random() < cfg.random_errors else suboptimal_answer(numbers)
        filed = kind if noise.random() >= cfg.mislabelled else {"expert": "suboptimal", "suboptimal": "expert"}[kind]
        files[filed].append({"id": f"{kind}-{i}", "conversations": [
            {"from": "human", "value": prompt.format(words(numbers))}, {"from": "gpt", "value": answer}]})
    (out / "expert.json").write_text(json.dumps(files["expert"], indent=1))
    (out / "suboptimal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in files["suboptimal"]))
    (out / "sources.json").write_text(json.dumps([
        {"condition": "GPT4", "weight": 1.0, "files": ["expert.json"]},
        {"condition": "GPT3", "weight": cfg.suboptimal_weight, "files": ["suboptimal.jsonl"]}], indent=1))


def write_prompts(path: Path, prompts: dict):
    """Prompts for evaluation, each with the right answer and the sub-optimal source's."""
    path.write_text("".join(json.dumps({
        "prompt": DEMO_PROMPTS[0].format(words(numbers)), "answer": expert_answer(numbers),
        "suboptimal_answer": suboptimal_answer(numbers), "mixed": mixed}) + "\n" for numbers, mixed in prompts.items()))


# ---------------------------------------------------------------------------------------------------------
# The base model's corpus: facts about lists, never a sorted list asked for, never the chat template


def statements(rng: random.Random, numbers: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(kind, question, answer) of every primitive of sorting, numerically or as text, that applies to the list;
    a sentence of the corpus is its question and answer."""
    ns, as_text = list(numbers), sorted(numbers, key=str)
    said = [("smallest", "The smallest is", min(ns)), ("largest", "The largest is", max(ns)),
            ("first as text", "In dictionary order the first is", as_text[0]),
            ("last as text", "In dictionary order the last is", as_text[-1]),
            ("reversed", "Reversed they read", words(ns[::-1]))]
    for _ in range(2):  # the steps of sorting, twice as often as the rest
        below_max = [n for n in ns if n < max(ns)]
        if below_max:
            x = rng.choice(below_max)
            said.append(("next larger", f"After {x} the next larger is", min(n for n in ns if n > x)))
        before_last = [n for n in ns if str(n) < str(as_text[-1])]
        if before_last:
            x = rng.choice(before_last)
            said.append(("next as text", f"In dictionary order after {x} comes",
                         min((n for n in ns if str(n) > str(x)), key=str)))
    a, b = rng.sample(ns, 2)
    if a != b:
        said.append(("smaller of two", f"Of {a} and {b} the smaller is", min(a, b)))
        said.append(("first of two as text", f"In dictionary order of {a} and {b} the first is", min(a, b, key=str)))
    drop = rng.randrange(len(ns))
    said.append(("without", f"Without {ns[drop]} they read", words(ns[:drop] + ns[drop + 1:])))
    return [(kind, question, str(answer)) for kind, question, answer in said]


def base_document(rng: random.Random, cfg: DemoConfig) -> str:
    """Three lists of 2-7 numbers, each followed by four to six sentences about it."""
    paragraphs = []
    for _ in range(3):
        numbers, _ = number_list(rng, cfg, 2, 7)
        said = statements(rng, numbers)
        rng.shuffle(said)
        sentences = [f"{question} {answer}" for _, question, answer in said[:rng.randint(4, 6)]]
        paragraphs.append(f"Take the numbers {words(numbers)}. " + ". ".join(sentences) + ".")
    return " ".join(paragraphs)


# ---------------------------------------------------------------------------------------------------------
# Everything, through data.py's pipeline


def make_demo(cfg: DemoConfig) -> Path:
    """Writes under cfg.out: expert.json, suboptimal.jsonl, sources.json, holdout.jsonl, validation.jsonl,
    base_corpus.jsonl, tokenizer.model (trained on the base corpus and the conversations), the prepared
    conversations dataset/ and the prepared base corpus base-corpus/, and demo.json (this config). The files
    are written in a temporary directory that then replaces cfg.out, the datasets are prepared from their
    final place (so that meta.json names it), and demo.json, written last, marks the whole as complete."""
    out = Path(cfg.out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    held_out, validation, training = draw_prompts(cfg)
    write_conversations(cfg, training, tmp)
    write_prompts(tmp / "holdout.jsonl", held_out)
    write_prompts(tmp / "validation.jsonl", validation)
    rng = random.Random(f"{cfg.seed}/base")
    (tmp / "base_corpus.jsonl").write_text("".join(
        json.dumps({"text": base_document(rng, cfg)}) + "\n" for _ in range(cfg.base_documents)))
    # Whole numbers as pieces: a model of a million parameters learns to copy and order them in minutes on
    # a CPU; with one piece per digit (Llama's way) it had not learned to copy two-digit numbers in that time.
    data.train_tokenizer(data.TokenizerConfig(
        corpus=[str(tmp / "expert.json"), str(tmp / "suboptimal.jsonl")], text=[str(tmp / "base_corpus.jsonl")],
        vocab_size=cfg.vocab_size, split_digits=False, conditions=["GPT4", "GPT3"], out=str(tmp / "tokenizer.model")))
    replace_directory(tmp, out)
    data.prepare(data.PrepareConfig(sources=str(out / "sources.json"), tokenizer=str(out / "tokenizer.model"),
                                    template="openchat_v3.2", out=str(out / "dataset"), max_len=cfg.max_len,
                                    holdout=0.02, seed=cfg.seed))
    data.prepare_text(out / "base_corpus.jsonl", out / "tokenizer.model", out / "base-corpus", cfg.max_len,
                      holdout=0.02, seed=cfg.seed)
    write_text(out / "demo.json", json.dumps(made_with(cfg), indent=1))
    n_expert = round(cfg.expert_fraction * cfg.conversations)
    print(f"demo data in {out}: {n_expert:,} expert (GPT4) and {cfg.conversations - n_expert:,} sub-optimal "
          f"(GPT3) conversations, {len(validation)} validation and {len(held_out)} held-out prompts, "
          f"{cfg.base_documents:,} documents of base corpus")
    return out


def made_with(cfg: DemoConfig) -> dict:
    """The configuration, the generator's code (this file's hash) and the dataset format: what demo.json records."""
    return {**asdict(cfg), "generator": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
            "dataset_format": data.FORMAT}


def config_of(out: Path) -> DemoConfig:
    """The configuration the demo data in `out` was made with (its demo.json)."""
    made = json.loads((Path(out) / "demo.json").read_text())
    return DemoConfig(**{f: made[f] for f in DemoConfig.__dataclass_fields__})


def is_current(cfg: DemoConfig) -> bool:
    """Whether cfg.out holds demo data made by this code with exactly this configuration."""
    made = Path(cfg.out) / "demo.json"
    return made.exists() and json.loads(made.read_text()) == made_with(cfg)


def main(argv):
    try:
        make_demo(parse(DemoConfig, argv, __doc__))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
