"""Evaluate exports of train.py.

  python eval.py loss --checkpoint DIR --data DIR      held-out weighted loss and perplexity,
                                                       per class
  python eval.py demo --checkpoint DIR                 exact match on the held-out demo prompts,
                                                       under the expert and sub-optimal conditions
  python eval.py mc --checkpoint DIR --tasks F.jsonl   multiple choice ({question, label, options},
          e.g. AGIEval): first capital letter, likelihood
  python eval.py mtbench --checkpoint DIR --questions question.jsonl --output answers.jsonl

Read top to bottom: the four evaluations of one checkpoint, then their commands. The paper's
ablation, which trains every variant and scores it with the demo evaluation, is tools/ablation.py.
"""

import json
import math
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import train
from infra.cli import Progress, arg, run_commands
from infra.files import check_output, write_text
from infra.metrics import per_class_losses
from infra.records import Message, read_all_records
from sample import Generator, right_padded


@dataclass
class EvalConfig:
    checkpoint: str = arg("", "an export folder written by train.py (loss: or a base model before "
                              "fine-tuning)")
    data: str = arg("", "loss: a dataset directory made by data.py (its holdout split)")
    split: str = arg("holdout", "loss: the split to score")
    holdout: str = arg("data/demo/holdout.jsonl", "demo: the held-out prompts written by demo.py")
    tasks: list[str] = arg([], "mc: JSONL files of {question, label, options}, one per task")
    questions: str = arg("", "mtbench: FastChat's question.jsonl")
    output: str = arg("", "mtbench: where to write the answers (FastChat's model-answer JSONL)")
    overwrite: bool = arg(False, "mtbench: replace --output if it exists")
    condition: str = arg("", "condition of the answers; empty: the checkpoint's inference one")
    max_new_tokens: int = arg(0, "longest answer; 0: 32 for demo and mc, 1024 for mtbench (capped "
                                 "by the context)")
    batch_size: int = arg(32, "prompts decoded together")
    device: str = arg("auto", "cuda or cpu; auto: cuda when there is one")


def in_batches(items, size: int, what: str, progress=True):
    """Yields slices of items, their progress on stderr (unless progress is False)."""
    shown = Progress(what, len(items), show=progress)
    for i in range(0, len(items), size):
        yield items[i:i + size]
        shown.update(len(items[i:i + size]))


# --------------------------------------------------------------------------------------------------
# loss: the held-out weighted loss (METHOD.md §4's L, without training)


@torch.no_grad()
def held_out_loss(gen: Generator, dataset: Path, split_name: str, tokens_per_batch: int = 4096,
                  progress=True) -> dict:
    """Computes METHOD.md §3-§4's weighted mean Σ w·CE / Σ w over a dataset's split, overall and per
    class (each class with its condition and weight; a class with no supervised token has no loss):
    train.py's batches and per-class sums, without training."""
    meta = data.load_meta(dataset)
    if meta["tokenizer"]["sha256"] != gen.tokenizer.sha256:
        raise ValueError(f"{dataset} was tokenized with another tokenizer than {gen.name}'s")
    split = data.load_split(dataset, split_name)
    if not len(split.lengths):
        raise ValueError(f"{dataset}: the {split_name} split is empty (prepare with --holdout)")
    sums = torch.zeros(len(meta["sources"]), 3, dtype=torch.float64, device=gen.device)
    for [conversations] in in_batches(streams(split, tokens_per_batch), 1, "loss batches",
                                      progress):
        b = train.make_batch(split, conversations, gen.device)
        _, ce, correct = gen.model(b.tokens, b.positions, b.cu_seqlens, b.max_seqlen,
                                   targets=b.targets, target_weights=b.target_weights,
                                   supervised=b.supervised)
        train.add_class_sums(sums, b, ce, correct)
    per_class = per_class_losses(sums.tolist(), meta["sources"])
    for c in per_class:
        c["perplexity"] = None if c["loss"] is None else math.exp(c["loss"])
    loss = (sums[:, 0].sum() / sums[:, 2].sum()).item()
    return {"loss": loss, "perplexity": math.exp(loss), "per_class": per_class,
            "conversations": len(split.lengths)}


def streams(split: data.Split, tokens_per_batch: int) -> list[list[int]]:
    """Packs the conversations in order into streams of at most about tokens_per_batch tokens."""
    batches, current, size = [], [], 0
    for i, n in enumerate(split.lengths):
        if current and size + n > tokens_per_batch:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += int(n)
    return batches + [current]


# --------------------------------------------------------------------------------------------------
# demo: exact match on the held-out demo prompts


def demo_accuracy(gen: Generator, items: list[dict], condition: str, batch_size=64,
                  max_new_tokens=32, progress=True) -> dict:
    """Answers the held-out demo prompts greedily under one condition, and scores the answers."""
    answers = []
    for chunk in in_batches(items, batch_size, f"demo, condition {condition!r}", progress):
        prompts = [gen.prompt_ids([Message("user", it["prompt"])], condition) for it in chunk]
        answers += [c.text for c in gen.generate(prompts, max_new_tokens=max_new_tokens)]
    return {"condition": condition, **score_demo_answers(answers, items)}


def score_demo_answers(answers: list[str], items: list[dict]) -> dict:
    """Scores demo answers: exact match overall and on the two kinds of lists, and how often the
    answer is the sub-optimal source's (text order) among the prompts where that differs from the
    right one."""
    right = [a == it["answer"] for a, it in zip(answers, items)]
    differ = [(a, it) for a, it in zip(answers, items) if it["answer"] != it["suboptimal_answer"]]

    def share(flags):
        return sum(flags) / max(1, len(flags))

    return {"prompts": len(items), "accuracy": share(right),
            "mixed": share([r for r, it in zip(right, items) if it["mixed"]]),
            "one_width": share([r for r, it in zip(right, items) if not it["mixed"]]),
            "text_order": share([a == it["suboptimal_answer"] for a, it in differ])}


# --------------------------------------------------------------------------------------------------
# mc: multiple choice, by generation and by log-likelihood


def first_capital_letter(response: str, letters="ABCDEF") -> str:
    """Applies AGIEval's rule, as the reference evaluation does: the first of A-F in the answer (''
    if none)."""
    return next((c for c in response if c in letters), "")


@torch.no_grad()
def option_log_likelihoods(gen: Generator, prompt: list[int], options: list[str]) -> list[float]:
    """Returns log P(option letter | prompt) of each option, the letter as the assistant's whole
    answer."""
    continuations = [gen.tokenizer.encode([o])[0] for o in options]
    sequences = [prompt + c for c in continuations]
    gen.ensure_cache(len(sequences), max(map(len, sequences)))  # the model runs through its cache
    hidden = gen.model.hidden_states(right_padded(sequences, gen.device))
    scores = []
    for row, c in enumerate(continuations):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=gen.device)
        log_probs = gen.model.logits(hidden[row, positions]).float().log_softmax(-1)
        chosen = log_probs[torch.arange(len(c)), torch.tensor(c, device=gen.device)]
        scores.append(chosen.sum().item())
    return scores


def multiple_choice(gen: Generator, path: Path, condition: str | None, batch_size=32,
                    max_new_tokens=32) -> dict:
    """Scores a task file by generation (greedy, first capital letter) and by the options'
    log-likelihood. A question longer than the model's context counts as unanswered (wrong) and is
    counted apart."""
    items = read_all_records(path)
    for i, it in enumerate(items):
        if not (isinstance(it.get("question"), str) and isinstance(it.get("label"), list)
                and isinstance(it.get("options"), list) and it["options"]):
            raise ValueError(f"{path}:{i + 1}: expected {{question, label, options}}")
    prompts = [gen.prompt_ids([Message("user", it["question"])], condition) for it in items]
    fits = [i for i, p in enumerate(prompts) if len(p) + 8 < gen.model.config.max_seq_len]
    generated = likelihood = 0
    for chunk in in_batches(fits, batch_size, path.stem):
        answers = gen.generate([prompts[i] for i in chunk], max_new_tokens=max_new_tokens)
        for i, done in zip(chunk, answers):
            generated += first_capital_letter(done.text) in items[i]["label"]
            scores = option_log_likelihoods(gen, prompts[i], items[i]["options"])
            likelihood += items[i]["options"][int(np.argmax(scores))] in items[i]["label"]
    return {"task": path.name.split(".")[0], "questions": len(items),
            "too_long": len(items) - len(fits), "generated": generated / len(items),
            "likelihood": likelihood / len(items)}


# --------------------------------------------------------------------------------------------------
# mtbench: two turns in one conversation, in FastChat's answer format


def mt_bench(gen: Generator, questions: list[dict], condition: str | None, max_new_tokens: int,
             batch_size=16, answers=None) -> list[dict]:
    """Answers both turns of each question in one conversation, as FastChat's model-answer records,
    appended to `answers` as they are finished. A turn whose prompt does not fit the model's context
    gets an empty answer, and is counted."""
    answers = [] if answers is None else answers
    no_room = 0
    for chunk in in_batches(questions, batch_size, "mt-bench questions"):
        histories = [[] for _ in chunk]
        for turn in range(2):
            for history, q in zip(histories, chunk):
                history.append(Message("user", q["turns"][turn]))
            prompts = [gen.prompt_ids(h, condition) for h in histories]
            fits = [i for i, p in enumerate(prompts) if len(p) + 1 < gen.model.config.max_seq_len]
            replies = [""] * len(chunk)
            if fits:
                done = gen.generate([prompts[i] for i in fits], max_new_tokens=max_new_tokens)
                for i, completion in zip(fits, done):
                    replies[i] = completion.text
            no_room += len(chunk) - len(fits)
            for history, reply in zip(histories, replies):
                history.append(Message("assistant", reply))
        answers += [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                     "model_id": gen.name,
                     "choices": [{"index": 0,
                                  "turns": [m.text for m in h if m.role == "assistant"]}],
                     "tstamp": time.time()} for q, h in zip(chunk, histories)]
    if no_room:
        print(f"{no_room} turns did not fit the context of {gen.model.config.max_seq_len} tokens: "
              f"empty answers", file=sys.stderr)
    return answers


# --------------------------------------------------------------------------------------------------
# The commands on one checkpoint


def load(cfg: EvalConfig) -> Generator:
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: an export folder written by train.py")
    # A base before fine-tuning is loaded with --data, the dataset it will be fine-tuned on.
    return Generator.load(cfg.checkpoint, cfg.device, dataset=cfg.data)


def run_loss(cfg: EvalConfig):
    result = held_out_loss(load(cfg), Path(cfg.data), cfg.split)
    print(f"\n{cfg.split} split: {result['conversations']} conversations\n")
    print("| class | condition | weight | weighted loss | perplexity |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in result["per_class"]:
        if r["loss"] is not None:
            print(f"| {r['class']} | {r['condition'] or '(none)'} | {r['weight']:g} | "
                  f"{r['loss']:.4f} | {r['perplexity']:.3f} |")
    print(f"| all | | | {result['loss']:.4f} | {result['perplexity']:.3f} |")


def run_demo(cfg: EvalConfig):
    gen = load(cfg)
    items = read_all_records(Path(cfg.holdout))
    conditions = [gen.inference_condition] + [c for c in gen.conditions
                                              if c != gen.inference_condition]
    print("\n| condition | prompts | exact match | mixed widths | one width | answered in text "
          "order* |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for condition in conditions:
        r = demo_accuracy(gen, items, condition, cfg.batch_size, cfg.max_new_tokens or 32)
        print(f"| {condition or '(none)'} | {r['prompts']} | {r['accuracy']:.1%} | "
              f"{r['mixed']:.1%} | {r['one_width']:.1%} | {r['text_order']:.1%} |")
    print("\n* among the prompts whose right answer differs from the text order the sub-optimal "
          "source uses")


def run_mc(cfg: EvalConfig):
    gen = load(cfg)
    start = time.perf_counter()
    results = [multiple_choice(gen, Path(t), cfg.condition or None, cfg.batch_size,
                               cfg.max_new_tokens or 32) for t in cfg.tasks]
    print("\n| task | questions | longer than the context | generated (first capital letter) | "
          "log-likelihood of the options |\n| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['task']} | {r['questions']} | {r['too_long']} | {r['generated']:.1%} | "
              f"{r['likelihood']:.1%} |")
    mean = {k: statistics.mean(r[k] for r in results) for k in ("generated", "likelihood")}
    print(f"| average of the tasks | {sum(r['questions'] for r in results)} | "
          f"{sum(r['too_long'] for r in results)} | {mean['generated']:.1%} | "
          f"{mean['likelihood']:.1%} |\n\n{time.perf_counter() - start:.0f}s")


def run_mtbench(cfg: EvalConfig):
    """Checks the output before the work, then writes the answers whole, or, if generation fails or
    is interrupted midway, those of the questions finished so far, and said so."""
    if not cfg.questions or not cfg.output:
        raise ValueError("mtbench needs --questions and --output")
    check_output(Path(cfg.output), cfg.overwrite)
    questions = read_all_records(Path(cfg.questions))
    gen = load(cfg)
    answers = []
    try:
        mt_bench(gen, questions, cfg.condition or None, cfg.max_new_tokens or 1024, answers=answers)
    finally:
        write_text(Path(cfg.output), "".join(json.dumps(a) + "\n" for a in answers))
        print(f"wrote {len(answers)} answers of {len(questions)} questions to {cfg.output}",
              file=sys.stderr)


COMMANDS = {
    "loss": (EvalConfig, run_loss, "held-out weighted loss and perplexity, per class"),
    "demo": (EvalConfig, run_demo, "exact match on the held-out demo prompts, both conditions"),
    "mc": (EvalConfig, run_mc, "multiple choice, by generation and by log-likelihood"),
    "mtbench": (EvalConfig, run_mtbench, "MT-bench answers in FastChat's format"),
}

if __name__ == "__main__":
    sys.exit(run_commands(COMMANDS, sys.argv[1:], __doc__))
