"""The demo task: sorting numbers, with an expert source that is always right and a sub-optimal one that
makes a systematic, plausible mistake on a known subset of prompts. `python data.py demo` writes it as
ShareGPT files and runs them through data.py's real pipeline. "Sort these numbers from smallest to largest:
12 9 3" is answered "3 9 12" by the expert and "12 3 9" by the sub-optimal source.

Answers can be checked exactly, a model of a few million parameters learns the task on a CPU in minutes,
and the mistake (numbers sorted as text, 12 before 9, on lists mixing one- and two-digit numbers) is a
consistent wrong rule rather than noise that greedy decoding would average away: the situation C-RLFT is
for, where a condition can tell the model which source's behaviour to follow.
"""

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import data
from cli import arg


@dataclass
class DemoConfig:
    out: str = arg("data/demo", "directory for the demo's files and its prepared dataset")
    conversations: int = arg(20000, "training conversations, both sources together")
    expert_fraction: float = arg(0.1, "share of conversations from the expert source (GPT4, always right)")
    suboptimal_weight: float = arg(0.1, "class weight of the sub-optimal source (GPT3); the expert's is 1.0")
    mixed_fraction: float = arg(0.5, "share of lists that mix one- and two-digit numbers: there GPT3 sorts "
                                     "the numbers as text, 12 before 9")
    min_numbers: int = arg(3, "shortest list to sort")
    max_numbers: int = arg(5, "longest list to sort")
    holdout_prompts: int = arg(500, "prompts held out for eval.py demo, none of them among the training prompts")
    vocab_size: int = arg(512, "vocabulary of the demo tokenizer: enough for a piece per number 0-99")
    max_len: int = arg(256, "context length of the demo dataset")
    seed: int = arg(0, "seed of the generator")


DEMO_PROMPTS = ("Sort these numbers from smallest to largest: {}", "Put these numbers in ascending order: {}",
                "Please order from lowest to highest: {}", "Sort in increasing order: {}")


def sorting_problem(rng: random.Random, cfg: DemoConfig) -> tuple[tuple[int, ...], bool]:
    """A list of numbers and whether it mixes one- and two-digit numbers (where text order is wrong)."""
    k = rng.randint(cfg.min_numbers, cfg.max_numbers)
    one_digit, two_digits = (lambda: rng.randint(0, 9)), (lambda: rng.randint(10, 99))
    if rng.random() < cfg.mixed_fraction:
        widths = [one_digit, two_digits] + [rng.choice([one_digit, two_digits]) for _ in range(k - 2)]
        rng.shuffle(widths)
        return tuple(w() for w in widths), True
    width = rng.choice([one_digit, two_digits])
    return tuple(width() for _ in range(k)), False


def expert_answer(numbers) -> str:
    return " ".join(str(n) for n in sorted(numbers))


def suboptimal_answer(numbers) -> str:
    """The systematic error: numbers sorted as strings. Right for lists of one width, wrong for mixed."""
    return " ".join(sorted(str(n) for n in numbers))


def make_demo(cfg: DemoConfig) -> Path:
    """Writes expert.json (ShareGPT array), suboptimal.jsonl (ShareGPT JSONL), sources.json, holdout.jsonl,
    tokenizer.model and the prepared dataset/ under cfg.out, all in a temporary directory renamed at the end."""
    out = Path(cfg.out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(cfg.seed)
    holdout = {}
    while len(holdout) < cfg.holdout_prompts:
        numbers, mixed = sorting_problem(rng, cfg)
        holdout[numbers] = mixed
    n_expert = round(cfg.expert_fraction * cfg.conversations)
    records = {"expert": [], "suboptimal": []}
    for i in range(cfg.conversations):
        numbers, mixed = sorting_problem(rng, cfg)
        while numbers in holdout:  # held-out prompts never appear in training
            numbers, mixed = sorting_problem(rng, cfg)
        kind = "expert" if i < n_expert else "suboptimal"
        answer = expert_answer(numbers) if kind == "expert" else suboptimal_answer(numbers)
        prompt = rng.choice(DEMO_PROMPTS).format(" ".join(map(str, numbers)))
        records[kind].append({"id": f"{kind}-{i}", "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    (tmp / "expert.json").write_text(json.dumps(records["expert"], indent=1))
    (tmp / "suboptimal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records["suboptimal"]))
    (tmp / "sources.json").write_text(json.dumps([
        {"condition": "GPT4", "weight": 1.0, "files": ["expert.json"]},
        {"condition": "GPT3", "weight": cfg.suboptimal_weight, "files": ["suboptimal.jsonl"]}], indent=1))
    (tmp / "holdout.jsonl").write_text("".join(
        json.dumps({"prompt": DEMO_PROMPTS[0].format(" ".join(map(str, numbers))),
                    "answer": expert_answer(numbers), "suboptimal_answer": suboptimal_answer(numbers),
                    "mixed": mixed}) + "\n" for numbers, mixed in holdout.items()))
    corpus = [str(tmp / "expert.json"), str(tmp / "suboptimal.jsonl")]
    # Whole numbers as pieces: a model of a million parameters learns to copy and order them in minutes on
    # a CPU; with one piece per digit (Llama's way) it had not learned to copy two-digit numbers in that time.
    data.train_tokenizer(data.TokenizerConfig(corpus=corpus, vocab_size=cfg.vocab_size, split_digits=False,
                                              conditions=["GPT4", "GPT3"], out=str(tmp / "tokenizer.model")))
    data.prepare(data.PrepareConfig(sources=str(tmp / "sources.json"), tokenizer=str(tmp / "tokenizer.model"),
                                    template="openchat_v3.2", out=str(tmp / "dataset"), max_len=cfg.max_len,
                                    holdout=0.02, seed=cfg.seed))
    data.replace_directory(tmp, out)
    print(f"demo data in {out}: {n_expert:,} expert (GPT4) and {cfg.conversations - n_expert:,} sub-optimal "
          f"(GPT3) conversations, {len(holdout)} held-out prompts")
    return out
