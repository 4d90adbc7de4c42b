"""Evaluate exports of train.py, and reproduce the paper's ablation table on the demo task.

  python eval.py loss --checkpoint DIR --data DIR          held-out weighted loss and perplexity, per class
  python eval.py demo --checkpoint DIR                     exact-match accuracy on the held-out demo prompts,
                                                           under the expert and the sub-optimal condition
  python eval.py mc --checkpoint DIR --tasks F.jsonl ...   multiple choice ({question, label, options}, e.g.
                                                           AGIEval): first capital letter, and log-likelihood
  python eval.py mtbench --checkpoint DIR --questions question.jsonl --output answers.jsonl

Read top to bottom: the four evaluations of one checkpoint, then their commands. The paper's ablation, which
trains every variant and scores it with the demo evaluation, is ablation.py.
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
from cli import arg, parse
from files import read_json, write_text
from sample import Generator, right_padded

@dataclass
class EvalConfig:
    checkpoint: str = arg("", "an export folder written by train.py (loss: or a base model before fine-tuning)")
    data: str = arg("", "loss: a dataset directory made by data.py (its holdout split)")
    split: str = arg("holdout", "loss: the split to score")
    holdout: str = arg("data/demo/holdout.jsonl", "demo: the held-out prompts written by data.py demo")
    tasks: list[str] = arg([], "mc: JSONL files of {question, label, options}, one per task")
    questions: str = arg("", "mtbench: FastChat's question.jsonl")
    output: str = arg("", "mtbench: where to write the answers (FastChat's model-answer JSONL)")
    condition: str = arg("", "condition of the answers; empty: the checkpoint's inference condition")
    max_new_tokens: int = arg(0, "longest answer; 0: 32 for demo and mc, 1024 for mtbench (capped by the context)")
    batch_size: int = arg(32, "prompts decoded together")
    device: str = arg("auto", "cuda or cpu; auto: cuda when there is one")


def in_batches(items, size: int, what: str, progress=True):
    """Yields slices of items, printing progress and the rate as it goes (unless progress is False)."""
    start = time.perf_counter()
    for i in range(0, len(items), size):
        yield items[i:i + size]
        done = min(i + size, len(items))
        elapsed = time.perf_counter() - start
        if progress:
            print(f"{what}: {done}/{len(items)}, {done / elapsed:.1f}/s, "
                  f"ETA {(len(items) - done) * elapsed / done:.0f}s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# loss: the held-out weighted loss (METHOD.md §2's L, without training)


@torch.no_grad()
def held_out_loss(gen: Generator, dataset: Path, split_name: str, tokens_per_batch: int = 4096,
                  progress=True) -> dict:
    meta = data.load_meta(dataset)
    if meta["tokenizer"]["sha256"] != gen.tokenizer.sha256:
        raise ValueError(f"{dataset} was tokenized with another tokenizer than {gen.name}'s")
    split = data.load_split(dataset, split_name)
    if not len(split.lengths):
        raise ValueError(f"{dataset}: the {split_name} split is empty (prepare with --holdout)")
    n_classes = len(meta["sources"])
    sums = np.zeros((n_classes, 2))  # per class: Σ w·CE, Σ w
    batches, current, size = [], [], 0
    for i, n in enumerate(split.lengths):  # conversations in order, packed into streams of ~tokens_per_batch
        if current and size + n > tokens_per_batch:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += int(n)
    batches.append(current)
    for [conversations] in in_batches(batches, 1, "loss batches", progress):
        s = data.pack_stream(split, conversations)
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(gen.device) for k, v in s.items()}
        _, ce, _ = gen.model(t["tokens"], t["positions"], t["cu_seqlens"], targets=t["targets"],
                             weights=t["weights"])
        w = t["weights"].double()
        np.add.at(sums, s["classes"], torch.stack([w * ce.double(), w], 1).cpu().numpy())
    per_class = {src["condition"] or f"class {c}": {"loss": sums[c, 0] / sums[c, 1], "perplexity":
                 math.exp(sums[c, 0] / sums[c, 1])} for c, src in enumerate(meta["sources"]) if sums[c, 1]}
    loss = sums[:, 0].sum() / sums[:, 1].sum()
    return {"loss": loss, "perplexity": math.exp(loss), "per_class": per_class,
            "conversations": len(split.lengths)}


# ---------------------------------------------------------------------------------------------------------
# demo: exact match on the held-out demo prompts


def read_jsonl(path: Path) -> list[dict]:
    records = list(data.read_records(path))
    for record, _ in records:
        if isinstance(record, data.BadInput):  # names the file and line
            raise record
    return [record for record, _ in records]


def demo_accuracy(gen: Generator, items: list[dict], condition: str, batch_size=64, max_new_tokens=32,
                  progress=True) -> dict:
    """Greedy answers to the held-out demo prompts under one condition, scored."""
    answers = []
    for chunk in in_batches(items, batch_size, f"demo, condition {condition!r}", progress):
        prompts = [gen.prompt_ids([data.Message("user", it["prompt"])], condition) for it in chunk]
        answers += [c.text for c in gen.generate(prompts, max_new_tokens=max_new_tokens)]
    return {"condition": condition, **score_demo_answers(answers, items)}


def score_demo_answers(answers: list[str], items: list[dict]) -> dict:
    """Exact match overall and on the two kinds of lists, and how often the answer is the sub-optimal
    source's (text order) among the prompts where that differs from the right one."""
    right = [a == it["answer"] for a, it in zip(answers, items)]
    differ = [(a, it) for a, it in zip(answers, items) if it["answer"] != it["suboptimal_answer"]]

    def share(flags):
        return sum(flags) / max(1, len(flags))

    return {"prompts": len(items), "accuracy": share(right),
            "mixed": share([r for r, it in zip(right, items) if it["mixed"]]),
            "one_width": share([r for r, it in zip(right, items) if not it["mixed"]]),
            "text_order": share([a == it["suboptimal_answer"] for a, it in differ])}


# ---------------------------------------------------------------------------------------------------------
# mc: multiple choice, by generation and by log-likelihood


def first_capital_letter(response: str, letters="ABCDEF") -> str:
    """AGIEval's rule, as the reference evaluation: the first of A-F anywhere in the answer ('' if none)."""
    return next((c for c in response if c in letters), "")


@torch.no_grad()
def option_log_likelihoods(gen: Generator, prompt: list[int], options: list[str]) -> list[float]:
    """log P(option letter | prompt) of each option, the letter being the assistant's whole answer."""
    continuations = [gen.tokenizer.encode([o])[0] for o in options]
    sequences = [prompt + c for c in continuations]
    gen.ensure_cache(len(sequences), max(map(len, sequences)))  # the model decodes through its KV cache
    hidden = gen.model.hidden_states(right_padded(sequences, gen.device))
    scores = []
    for row, c in enumerate(continuations):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=gen.device)
        log_probs = gen.model.logits(hidden[row, positions]).float().log_softmax(-1)
        scores.append(log_probs[torch.arange(len(c)), torch.tensor(c, device=gen.device)].sum().item())
    return scores


def multiple_choice(gen: Generator, path: Path, condition: str | None, batch_size=32, max_new_tokens=32) -> dict:
    """Accuracy by generation (greedy, first capital letter) and by the options' log-likelihood. A question
    longer than the model's context counts as unanswered (wrong) and is counted apart."""
    items = read_jsonl(path)
    for i, it in enumerate(items):
        if not (isinstance(it.get("question"), str) and isinstance(it.get("label"), list)
                and isinstance(it.get("options"), list) and it["options"]):
            raise ValueError(f"{path}:{i + 1}: expected {{question, label, options}}")
    prompts = [gen.prompt_ids([data.Message("user", it["question"])], condition) for it in items]
    fits = [i for i, p in enumerate(prompts) if len(p) + 8 < gen.model.config.max_seq_len]
    generated, likelihood = 0, 0
    for chunk in in_batches(fits, batch_size, path.stem):
        for i, done in zip(chunk, gen.generate([prompts[i] for i in chunk], max_new_tokens=max_new_tokens)):
            generated += first_capital_letter(done.text) in items[i]["label"]
            scores = option_log_likelihoods(gen, prompts[i], items[i]["options"])
            likelihood += items[i]["options"][int(np.argmax(scores))] in items[i]["label"]
    return {"task": path.name.split(".")[0], "questions": len(items), "too_long": len(items) - len(fits),
            "generated": generated / len(items), "likelihood": likelihood / len(items)}


# ---------------------------------------------------------------------------------------------------------
# mtbench: two turns in one conversation, in FastChat's answer format


def mt_bench(gen: Generator, questions: list[dict], condition: str | None, max_new_tokens: int,
             batch_size=16) -> list[dict]:
    """FastChat's model-answer records: both turns of each question answered in one conversation. A turn
    whose prompt does not fit the model's context gets an empty answer, and is counted."""
    answers, no_room = [], 0
    for chunk in in_batches(questions, batch_size, "mt-bench questions"):
        histories = [[] for _ in chunk]
        for turn in range(2):
            for history, q in zip(histories, chunk):
                history.append(data.Message("user", q["turns"][turn]))
            prompts = [gen.prompt_ids(h, condition) for h in histories]
            fits = [i for i, p in enumerate(prompts) if len(p) + 1 < gen.model.config.max_seq_len]
            replies = [""] * len(chunk)
            if fits:
                for i, done in zip(fits, gen.generate([prompts[i] for i in fits], max_new_tokens=max_new_tokens)):
                    replies[i] = done.text
            no_room += len(chunk) - len(fits)
            for history, reply in zip(histories, replies):
                history.append(data.Message("assistant", reply))
        answers += [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": gen.name,
                     "choices": [{"index": 0, "turns": [m.text for m in h if m.role == "assistant"]}],
                     "tstamp": time.time()} for q, h in zip(chunk, histories)]
    if no_room:
        print(f"{no_room} turns did not fit the context of {gen.model.config.max_seq_len} tokens: empty answers",
              file=sys.stderr)
    return answers


# ---------------------------------------------------------------------------------------------------------
# The commands on one checkpoint


def load(cfg: EvalConfig) -> Generator:
    if not cfg.checkpoint:
        raise SystemExit("--checkpoint is required: an export folder written by train.py")
    return Generator.load(cfg.checkpoint, cfg.device, dataset=cfg.data)  # a base before fine-tuning: with --data


def run_loss(cfg: EvalConfig):
    result = held_out_loss(load(cfg), Path(cfg.data), cfg.split)
    print(f"\n{cfg.split} split: {result['conversations']} conversations\n")
    print("| class | weighted loss | perplexity |\n| --- | ---: | ---: |")
    for name, r in result["per_class"].items():
        print(f"| {name} | {r['loss']:.4f} | {r['perplexity']:.3f} |")
    print(f"| all | {result['loss']:.4f} | {result['perplexity']:.3f} |")


def run_demo(cfg: EvalConfig):
    gen = load(cfg)
    items = read_jsonl(Path(cfg.holdout))
    conditions = [gen.inference_condition] + [c for c in read_json(Path(cfg.checkpoint) / "crlft.json")["conditions"]
                                              if c != gen.inference_condition]
    print("\n| condition | prompts | exact match | mixed widths | one width | answered in text order* |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for condition in conditions:
        r = demo_accuracy(gen, items, condition, cfg.batch_size, cfg.max_new_tokens or 32)
        print(f"| {condition or '(none)'} | {r['prompts']} | {r['accuracy']:.1%} | {r['mixed']:.1%} | "
              f"{r['one_width']:.1%} | {r['text_order']:.1%} |")
    print("\n* among the prompts whose right answer differs from the text order the sub-optimal source uses")


def run_mc(cfg: EvalConfig):
    gen = load(cfg)
    start = time.perf_counter()
    results = [multiple_choice(gen, Path(t), cfg.condition or None, cfg.batch_size, cfg.max_new_tokens or 32)
               for t in cfg.tasks]
    print("\n| task | questions | longer than the context | generated (first capital letter) | "
          "log-likelihood of the options |\n| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['task']} | {r['questions']} | {r['too_long']} | {r['generated']:.1%} | {r['likelihood']:.1%} |")
    mean = {k: statistics.mean(r[k] for r in results) for k in ("generated", "likelihood")}
    print(f"| average of the tasks | {sum(r['questions'] for r in results)} | {sum(r['too_long'] for r in results)} "
          f"| {mean['generated']:.1%} | {mean['likelihood']:.1%} |\n\n{time.perf_counter() - start:.0f}s")


def run_mtbench(cfg: EvalConfig):
    if not cfg.questions or not cfg.output:
        raise SystemExit("mtbench needs --questions and --output")
    gen = load(cfg)
    answers = mt_bench(gen, read_jsonl(Path(cfg.questions)), cfg.condition or None, cfg.max_new_tokens or 1024)
    write_text(Path(cfg.output), "".join(json.dumps(a) + "\n" for a in answers))
    print(f"wrote {len(answers)} answers to {cfg.output}")


COMMANDS = {"loss": run_loss, "demo": run_demo, "mc": run_mc, "mtbench": run_mtbench}


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        print(__doc__ + "\n`python eval.py COMMAND --help` lists a command's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        COMMANDS[argv[0]](parse(EvalConfig, argv[1:], __doc__))
    except (ValueError, OSError) as e:  # a missing checkpoint or dataset, an unknown condition: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
