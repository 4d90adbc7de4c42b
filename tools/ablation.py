"""The paper's ablation on the demo task. Wang et al. (arXiv 2309.11235) compare six ways to
fine-tune on the same mixed-quality data: C-RLFT, the condition alone (equal weights), the weights
alone (no condition), and plain SFT on all, on the expert and on the sub-optimal data. Here each of
them fine-tunes the demo's pretrained base with train.py, under one protocol that was written down
before any result was seen (docs/ABLATION.md, its design and results).

  python -m tools.ablation                        # the main table: 5 epochs of each variant's data
  python -m tools.ablation --arm=compute-matched  # each variant for C-RLFT's number of steps
  python -m tools.ablation --arm=random-errors    # half the sub-optimal answers random slips
  python -m tools.ablation --arm=mislabelled      # 5% of each source under the other's condition

The protocol. Every run fine-tunes the base for the same number of epochs over its own data
(compute-matched: for C-RLFT's number of steps), in optimizer steps of batch_max_len tokens, and is
scored at every epoch on the validation prompts (drawn like the training prompts, never trained
on); it is read at the epoch that scores best. A variant's learning rate is the grid's best on
validation at the first seed; its other seeds run at that rate. The held-out prompts are scored
only at the chosen epochs. Runs go side by side, one thread each: on two cores, two processes of
two threads each run ten times slower.

Read top to bottom: the configuration, the variants and the arms; the datasets; one run (train,
then score); the protocol (the grid, then the seeds); the expected time; the tables and the plot.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

import data
import train
from demo import (DemoConfig, config_of, draw_prompts, ensure_base, number_list, statements, words,
                  write_conversations)
from eval import demo_accuracy, held_out_loss
from infra.cli import arg, run_command
from infra.exports import read_export
from infra.files import check_writable_folder, read_json, write_text
from infra.records import read_all_records
from infra.run_plan import pack_epoch
from sample import Generator

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# Configuration, variants and arms


@dataclass
class AblationConfig:
    arm: str = arg("main", "main, compute-matched, random-errors or mislabelled (see above)")
    out: str = arg("runs/ablation", "directory for the runs, each arm's table (ARM.md), results "
                                    "and plot")
    demo: str = arg("data/demo", "the demo data; demo.py makes it, and the base every variant "
                                 "fine-tunes, when missing or made with other settings")
    seeds: int = arg(3, "seeds per variant: the first tries every learning rate, the others the "
                        "chosen one")
    lrs: list[float] = arg([5e-4, 1.5e-3, 4.5e-3], "the learning-rate grid")
    epochs: int = arg(5, "epochs of every run over its own data (the paper's recipe)")
    batch_max_len: int = arg(4096, "tokens of one optimizer step")
    workers: int = arg(2, "runs side by side, one thread each")
    max_new_tokens: int = arg(8, "longest answer when scoring: a right one has at most 5 numbers "
                                 "and the end of its turn")


@dataclass(frozen=True)
class Variant:
    name: str
    sources: tuple  # (file of the demo, condition, class weight) per source, the expert's first
    condition: str  # the condition it is prompted with ("": the plain "User:" / "Assistant:")
    paper: str  # the paper's figure: the average of AlpacaEval, MT-bench and Vicuna-bench
    runs_of: str = ""  # scored on another variant's runs at their chosen epochs, not trained


EXPERT, SUBOPTIMAL = "expert.json", "suboptimal.jsonl"
VARIANTS = (
    Variant("C-RLFT (condition + weights)", ((EXPERT, "GPT4", 1.0), (SUBOPTIMAL, "GPT3", 0.1)),
            "GPT4", "77.3"),
    Variant("C-RLFT, prompted with the sub-optimal condition", (), "GPT3", "lower than 77.3",
            runs_of="C-RLFT (condition + weights)"),
    Variant("condition only (equal weights)", ((EXPERT, "GPT4", 1.0), (SUBOPTIMAL, "GPT3", 1.0)),
            "GPT4", "74.0"),
    Variant("weights only (no condition)", ((EXPERT, "", 1.0), (SUBOPTIMAL, "", 0.1)), "", "60.5"),
    Variant("SFT on all data", ((EXPERT, "", 1.0), (SUBOPTIMAL, "", 1.0)), "", "52.7"),
    Variant("SFT on expert data only", ((EXPERT, "", 1.0),), "", "64.5"),
    Variant("SFT on sub-optimal data only", ((SUBOPTIMAL, "", 1.0),), "", "42.8"),
)
BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class Arm:
    about: str
    variants: tuple[str, ...]
    noise: tuple = ()  # DemoConfig fields that change the conversations, as (field, value) pairs
    compute_matched: bool = False


# C-RLFT (under both conditions), condition only, weights only
WHERE_WEIGHTS_MATTER = tuple(v.name for v in VARIANTS[:4])
ARMS = {
    "main": Arm("every variant for the same number of epochs over its own data", tuple(BY_NAME)),
    "compute-matched": Arm("every variant for C-RLFT's number of optimizer steps", tuple(BY_NAME),
                           compute_matched=True),
    "random-errors": Arm("half of the sub-optimal answers a random slip (the right order with two "
                         "neighbours swapped) instead of text order", WHERE_WEIGHTS_MATTER,
                         (("random_errors", 0.5),)),
    "mislabelled": Arm("5% of each source's conversations filed under the other source, its "
                       "condition and weight", WHERE_WEIGHTS_MATTER, (("mislabelled", 0.05),)),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower().split(" (")[0]).strip("-")


# --------------------------------------------------------------------------------------------------
# The datasets: the demo's files (or an arm's variation of them) under each variant's conditions
# and weights


def conversation_files(cfg: AblationConfig, arm_name: str) -> Path:
    """The folder of expert.json and suboptimal.jsonl: the demo's own, or for an arm with noise the
    same prompts with the arm's answers and labels (demo.py writes both from one seed)."""
    arm, demo = ARMS[arm_name], Path(cfg.demo)
    if not arm.noise:
        return demo
    folder = Path(cfg.out) / arm_name / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    made = config_of(demo)
    varied = replace(made, **dict(arm.noise))
    write_conversations(varied, draw_prompts(varied)[2], folder)
    return folder


def prepare_dataset(sources, files: Path, demo: Path, out: Path) -> Path:
    """data.py's pipeline on the files under the variant's conditions and weights, the demo's
    tokenizer and context, made again (the same) on each run; its summary and progress go to a log
    beside the dataset."""
    with (open(out.parent / "prepare.log", "a") as log, contextlib.redirect_stdout(log),
          contextlib.redirect_stderr(log)):
        data.prepare(data.PrepareConfig(
            source=[f"{condition}:{weight}:{files / file}" for file, condition, weight in sources],
            tokenizer=str(demo / "tokenizer.model"), template="openchat_v3.2", out=str(out),
            max_len=data.load_meta(demo / "dataset")["max_len"], overwrite=True,
            dedup=False))  # as the demo's dataset: repeated prompts are samples of the task
    return out


def held_out_answers(demo: Path, out: Path) -> Path:
    """The held-out prompts with the expert's and the sub-optimal source's answers, as two ShareGPT
    files: what each class's held-out loss is measured on."""
    out.mkdir(parents=True, exist_ok=True)
    items = read_all_records(demo / "holdout.jsonl")
    for file, key in ((EXPERT, "answer"), (SUBOPTIMAL, "suboptimal_answer")):
        (out / file).write_text("".join(json.dumps({"conversations": [
            {"from": "human", "value": it["prompt"]}, {"from": "gpt", "value": it[key]}]}) + "\n"
            for it in items))
    return out


def class_conditions(variant: Variant) -> tuple[str, str]:
    """The condition each class (expert, sub-optimal) carried in the variant's training; a class it
    did not train on is given the variant's own condition."""
    trained = {file: condition for file, condition, _ in variant.sources}
    return trained.get(EXPERT, variant.condition), trained.get(SUBOPTIMAL, variant.condition)


def fingerprint(*paths: Path) -> str:
    """What a run's result depends on, by content: a changed dataset or base is never mistaken for
    the old."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# One run: train.py in a process of its own (one thread), then scored here at every epoch


@dataclass(frozen=True)
class Job:
    variant: str
    lr: float
    seed: int
    max_steps: int = 0  # 0: every epoch


@lru_cache(maxsize=None)
def plan_size(dataset: Path, seed: int, epochs: int, max_steps: int,
              batch_max_len: int) -> tuple[int, int, int]:
    """(optimizer steps, tokens, epochs begun) of a train.py run, from its own packing plan:
    `epochs` epochs, or with max_steps exactly that many steps over as many epochs as they take."""
    _, split = train.load_data(dataset)
    cfg = train.TrainConfig(data=str(dataset), seed=seed, batch_max_len=batch_max_len,
                            grad_accum=1)
    steps = tokens = epoch = 0
    while (steps < max_steps) if max_steps else (epoch < epochs):
        plan = pack_epoch(split, cfg, 1, epoch)
        for [conversations] in plan[:(max_steps - steps) if max_steps else None]:
            steps += 1
            tokens += int(split.lengths[conversations].sum())
        epoch += 1
    return steps, tokens, epoch


class Runner:
    """Trains and scores the jobs of one arm: the data of every variant, the scoring sets, the
    cache."""

    def __init__(self, cfg: AblationConfig, arm_name: str, base: Path):
        self.cfg = cfg
        self.arm = ARMS[arm_name]
        self.base = base
        demo = Path(cfg.demo)
        out = Path(cfg.out)
        self.tag = arm_name if self.arm.noise else "demo"  # main and compute-matched share runs
        files = conversation_files(cfg, arm_name)
        answers = held_out_answers(demo, out / "held-out-answers")
        self.datasets = {}
        self.probes = {}
        for name in self.arm.variants:
            variant = BY_NAME[name]
            if variant.runs_of:
                continue
            folder = out / self.tag / slug(name)
            folder.mkdir(parents=True, exist_ok=True)
            self.datasets[name] = prepare_dataset(variant.sources, files, demo, folder / "dataset")
            expert_condition, suboptimal_condition = class_conditions(variant)
            classes = ((EXPERT, expert_condition, 1.0), (SUBOPTIMAL, suboptimal_condition, 1.0))
            self.probes[name] = prepare_dataset(classes, answers, demo, folder / "held-out-loss")
        self.validation = read_all_records(demo / "validation.jsonl")
        self.held_out = read_all_records(demo / "holdout.jsonl")
        self.base_print = fingerprint(base / "model.safetensors")
        self.score_lock = threading.Lock()  # one scoring at a time: they share one thread

    def size(self, job: Job) -> tuple[int, int, int]:
        return plan_size(self.datasets[job.variant], job.seed, self.cfg.epochs, job.max_steps,
                         self.cfg.batch_max_len)

    def run_dir(self, job: Job) -> Path:
        name = f"lr-{job.lr:g}-seed-{job.seed}"
        name += f"-steps-{job.max_steps}" if job.max_steps else ""
        return Path(self.cfg.out) / self.tag / slug(job.variant) / name

    def run(self, job: Job) -> dict:
        """The job's result, trained and scored now or read back from an earlier identical run."""
        run = self.run_dir(job)
        dataset = self.datasets[job.variant]
        spec = {**asdict(job), "epochs": self.cfg.epochs, "batch_max_len": self.cfg.batch_max_len,
                "base": self.base_print, "validation": len(self.validation),
                "held_out": len(self.held_out),
                "data": fingerprint(*(dataset / "train" / f"{a}.npy" for a in data.ARRAYS))}
        if (run / "result.json").exists() and read_json(run / "result.json")["spec"] == spec:
            return {**read_json(run / "result.json"), "cached": True}
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        steps, tokens, epochs = self.size(job)
        command = [sys.executable, str(ROOT / "train.py"), f"--data={dataset}",
                   f"--base={self.base}", f"--out={run}", f"--epochs={epochs}",
                   f"--max-steps={job.max_steps}", f"--seed={job.seed}", f"--lr={job.lr}",
                   f"--batch-max-len={self.cfg.batch_max_len}", "--log-every=50"]
        with open(run / "train.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode:
                raise RuntimeError(f"training {run} failed: see {run / 'train.log'}")
        with self.score_lock:
            result = {"spec": spec, "steps": steps, "tokens": tokens, **self.score(job, run)}
        write_text(run / "result.json", json.dumps(result, indent=1))
        shutil.rmtree(run / "checkpoints")  # kept: metrics, log, result and the chosen export
        for export in (run / "exports").iterdir():
            if export.name != result["chosen"]:
                shutil.rmtree(export)
        return result

    def score(self, job: Job, run: Path) -> dict:
        """Validation exact match at every export; at the best one, the held-out prompts under the
        variant's condition (and the conditions of the variants scored on its runs) and each
        class's held-out loss."""
        variant = BY_NAME[job.variant]
        exports = sorted((run / "exports").iterdir(),
                         key=lambda p: read_export(p).step)
        curve = []
        for export in exports:
            gen = Generator.load(export, device="cpu")
            scores = demo_accuracy(gen, self.validation, variant.condition,
                                   max_new_tokens=self.cfg.max_new_tokens, progress=False)
            curve.append({"export": export.name, "step": read_export(export).step,
                          "validation": scores["accuracy"]})
        chosen = curve[choose_epoch([c["validation"] for c in curve])]["export"]
        gen = Generator.load(run / "exports" / chosen, device="cpu")
        # The losses first: a packed stream does not run through generation's KV cache.
        loss = held_out_loss(gen, self.probes[job.variant], "train", progress=False)["per_class"]
        expert_loss, suboptimal_loss = (c["loss"] for c in loss)  # class order: the expert first
        conditions = {v.name: v.condition for v in VARIANTS
                      if job.variant in (v.name, v.runs_of)}
        held_out = {name: demo_accuracy(gen, self.held_out, condition,
                                        max_new_tokens=self.cfg.max_new_tokens, progress=False)
                    for name, condition in conditions.items()}
        return {"curve": curve, "chosen": chosen, "held_out": held_out,
                "loss": {"expert": expert_loss, "suboptimal": suboptimal_loss}}


def choose_epoch(validation: list[float]) -> int:
    """The index of the best validation score; the earliest of equals (the paper: save every epoch,
    pick the best)."""
    return max(range(len(validation)), key=lambda i: (validation[i], -i))


def choose_lr(grid: dict[float, dict]) -> float:
    """The learning rate whose run scores best on validation at its chosen epoch; the smallest of
    equals."""
    return max(sorted(grid), key=lambda lr: (best_validation(grid[lr]), -lr))


def best_validation(result: dict) -> float:
    return next(c["validation"] for c in result["curve"] if c["export"] == result["chosen"])


# --------------------------------------------------------------------------------------------------
# The protocol: the grid on the first seed, then the other seeds at each variant's chosen rate


def jobs_of(runner: Runner, cfg: AblationConfig, variant: str, seeds, lrs) -> list[Job]:
    """A variant's runs; compute-matched, each for C-RLFT's number of steps at the same seed."""
    jobs = []
    for seed in seeds:
        max_steps = 0
        if runner.arm.compute_matched:
            crlft = runner.datasets[VARIANTS[0].name]
            target = plan_size(crlft, seed, cfg.epochs, 0, cfg.batch_max_len)[0]
            own = plan_size(runner.datasets[variant], seed, cfg.epochs, 0, cfg.batch_max_len)[0]
            max_steps = 0 if own == target else target  # the main table's run when they agree
        jobs += [Job(variant, lr, seed, max_steps) for lr in lrs]
    return jobs


def run_protocol(cfg: AblationConfig, runner: Runner, estimate) -> dict:
    """Every job of the arm, `workers` at a time, biggest first; returns {variant: {"grid", "lr",
    "runs"}}."""
    trained = [name for name in runner.arm.variants if not BY_NAME[name].runs_of]
    results = {name: {"grid": {}, "lr": None, "runs": []} for name in trained}
    queue = sorted((j for name in trained for j in jobs_of(runner, cfg, name, [0], cfg.lrs)),
                   key=lambda j: -runner.size(j)[0])
    total_jobs = len(trained) * (len(cfg.lrs) + cfg.seeds - 1)
    start = time.perf_counter()
    done = 0
    expected_left = estimate["work_s"]
    with ThreadPoolExecutor(cfg.workers) as pool:
        running = {}
        while queue or running:
            while queue and len(running) < cfg.workers:
                job = queue.pop(0)
                running[pool.submit(runner.run, job)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                result = future.result()
                entry = results[job.variant]
                if job.seed == 0:
                    entry["grid"][job.lr] = result
                if len(entry["grid"]) == len(cfg.lrs) and entry["lr"] is None:  # grid complete
                    entry["lr"] = choose_lr(entry["grid"])
                    entry["runs"].append(entry["grid"][entry["lr"]])
                    queue += jobs_of(runner, cfg, job.variant, range(1, cfg.seeds), [entry["lr"]])
                    queue.sort(key=lambda j: -runner.size(j)[0])
                elif job.seed > 0:
                    entry["runs"].append(result)
                done += 1
                expected_left -= estimate["job_s"](runner.size(job)[0])
                elapsed = time.perf_counter() - start
                curve = " ".join(f"{c['validation']:.0%}" for c in result["curve"])
                cached = " (cached)" if result.get("cached") else ""
                print(f"[{done}/{total_jobs}] {job.variant}, lr {job.lr:g}, seed {job.seed}: "
                      f"validation {curve} -> {result['chosen']}{cached} | {elapsed / 60:.1f} min, "
                      f"ETA {max(0, expected_left) / cfg.workers / 60:.1f} min", flush=True)
    for entry in results.values():
        entry["runs"].sort(key=lambda r: r["spec"]["seed"])
    return results


# --------------------------------------------------------------------------------------------------
# The expected time, from two pairs of short runs side by side and one scoring


def estimate_time(cfg: AblationConfig, runner: Runner) -> dict:
    """Seconds per optimizer step and per run start, from 10- and 50-step runs of C-RLFT's data
    `workers` at a time, and seconds to score one export. (Probes of 8 and 24 steps gave 0.35 s a
    step where the main table's runs took 0.44.)"""
    probe_dir = Path(cfg.out) / "probe"
    timings = {}
    for steps in (10, 50):
        begin = time.perf_counter()
        with ThreadPoolExecutor(cfg.workers) as pool:
            list(pool.map(lambda w: subprocess.run(
                [sys.executable, str(ROOT / "train.py"),
                 f"--data={runner.datasets[VARIANTS[0].name]}", f"--base={runner.base}",
                 f"--out={probe_dir / f'{steps}-{w}'}", f"--max-steps={steps}",
                 f"--batch-max-len={cfg.batch_max_len}", "--log-every=1000"], capture_output=True,
                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True),
                range(cfg.workers)))
        timings[steps] = time.perf_counter() - begin
    per_step = (timings[50] - timings[10]) / 40
    start_s = timings[10] - 10 * per_step
    begin = time.perf_counter()
    gen = Generator.load(probe_dir / "50-0" / "exports" / "step-50", device="cpu")
    demo_accuracy(gen, runner.validation, "GPT4", max_new_tokens=cfg.max_new_tokens, progress=False)
    score_s = time.perf_counter() - begin
    shutil.rmtree(probe_dir)

    def job_s(steps: int) -> float:  # `workers` runs at a time; held-out scoring as 3 exports
        return start_s + steps * per_step + (cfg.epochs + 3) * score_s

    return {"per_step_s": per_step, "start_s": start_s, "score_s": score_s, "job_s": job_s,
            "probe_s": sum(timings.values()) + score_s}


# --------------------------------------------------------------------------------------------------
# What the base knows before any fine-tuning


def demo_base(cfg: AblationConfig) -> Path:
    """The base every variant fine-tunes: demo.py's, for the demo data in cfg.demo, made (with the
    data) when missing or made with other settings."""
    if (Path(cfg.demo) / "demo.json").exists():
        return ensure_base(replace(config_of(Path(cfg.demo)), out=cfg.demo))
    return ensure_base(DemoConfig(out=cfg.demo))


def base_report(cfg: AblationConfig, base: Path, lists: int = 200) -> dict:
    """The base's held-out loss on its own corpus, and its greedy accuracy on each primitive of the
    corpus for fresh lists of the task's lengths, asked as the corpus asks them ("Take the numbers
    12 9 3. The smallest is" → "3")."""
    gen = Generator.load(base, device="cpu")
    loss = held_out_loss(gen, Path(cfg.demo) / "base-corpus", "holdout", progress=False)["loss"]
    made = config_of(Path(cfg.demo))
    rng = random.Random(f"{made.seed}/skills")
    asked = {}
    for _ in range(lists):
        numbers, _ = number_list(rng, made, made.min_numbers, made.max_numbers)
        for kind, question, answer in statements(rng, numbers):
            asked.setdefault(kind, {})[f"Take the numbers {words(numbers)}. {question}"] = answer
    skills = {}
    for kind, items in asked.items():
        prompts = [[gen.tokenizer.bos_id] + ids for ids in gen.tokenizer.encode(list(items))]
        outputs = gen.generate(prompts, max_new_tokens=8)
        right = [out.text.split(".")[0].strip() == answer
                 for out, answer in zip(outputs, items.values())]
        skills[kind] = sum(right) / len(right)
    return {"held_out_loss": loss, "skills": skills, "lists": lists}


# --------------------------------------------------------------------------------------------------
# The command, the tables and the plot


def ablation(cfg: AblationConfig) -> dict:
    if cfg.arm not in ARMS:
        raise ValueError(f"--arm={cfg.arm}: unknown; arms: {', '.join(ARMS)}")
    check_writable_folder(Path(cfg.out))
    torch.set_num_threads(1)  # this process scores while the other workers train
    start = time.perf_counter()
    base_export = demo_base(cfg)
    base = base_report(cfg, base_export)
    skills = ", ".join(f"{k} {v:.0%}" for k, v in base["skills"].items())
    print(f"the base ({base_export}): held-out loss {base['held_out_loss']:.3f} on its corpus; "
          f"greedy accuracy on {base['lists']} fresh lists: {skills}", flush=True)
    runner = Runner(cfg, cfg.arm, base_export)
    estimate = estimate_time(cfg, runner)
    estimate["work_s"] = expected_work(cfg, runner, estimate)
    print_expected_time(cfg, runner, estimate, time.perf_counter() - start)
    results = run_protocol(cfg, runner, estimate)
    seconds = time.perf_counter() - start
    report = tables(cfg, runner, results, seconds) + base_table(base)
    print("\n" + report)
    out = Path(cfg.out)
    write_text(out / f"{cfg.arm}.md", report)
    write_text(out / f"{cfg.arm}.json", json.dumps(
        {"config": asdict(cfg), "seconds": seconds, "base": base, "results": results}, indent=1))
    plot(runner, results, out / f"{cfg.arm}.png")
    return results


def expected_work(cfg: AblationConfig, runner: Runner, estimate: dict) -> float:
    """Seconds of every job of the arm, one worker's worth, by the estimate."""
    work = 0.0
    for name in [name for name in runner.arm.variants if not BY_NAME[name].runs_of]:
        jobs = jobs_of(runner, cfg, name, [0], cfg.lrs)
        jobs += jobs_of(runner, cfg, name, range(1, cfg.seeds), [cfg.lrs[0]])
        work += sum(estimate["job_s"](runner.size(j)[0]) for j in jobs)
    return work


def print_expected_time(cfg: AblationConfig, runner: Runner, estimate: dict, so_far: float):
    trained = [name for name in runner.arm.variants if not BY_NAME[name].runs_of]
    left = estimate["work_s"] / cfg.workers
    print(f"\nablation, arm {cfg.arm}: {runner.arm.about}. {len(trained)} trained variants × "
          f"({len(cfg.lrs)} learning rates + {cfg.seeds - 1} more seeds): expected about "
          f"{(so_far + left) / 60:.0f} min in all, {left / 60:.0f} from now "
          f"({estimate['per_step_s']:.2f}s a step and {estimate['start_s']:.0f}s a start with "
          f"{cfg.workers} side by side, {estimate['score_s']:.1f}s to score an export), less for "
          f"runs already done\n", flush=True)


def rows_of(runner: Runner, results: dict) -> dict:
    """Per variant of the arm (the evaluation-only ones included): its runs' results at the chosen
    epochs."""
    rows = {}
    for name in runner.arm.variants:
        trained = BY_NAME[name].runs_of or name
        rows[name] = [{**r, "scores": r["held_out"][name]} for r in results[trained]["runs"]]
    return rows


def mean_sd(values, scale=100.0, digits=1) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(cfg: AblationConfig, runner: Runner, results: dict, seconds: float) -> str:
    rows = rows_of(runner, results)
    lines = ["| variant | prompted with | exact match, % | mixed widths, % | one width, % | "
             "in text order, %* | loss, expert answers | loss, sub-optimal answers | "
             "paper (avg. of 3 benchmarks) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in rows.items():
        v = BY_NAME[name]
        scores = {k: mean_sd([r["scores"][k] for r in runs])
                  for k in ("accuracy", "mixed", "one_width", "text_order")}
        losses = {k: mean_sd([r["loss"][k] for r in runs], 1, 3) for k in ("expert", "suboptimal")}
        lines.append(f"| {name} | {v.condition or '(no condition)'} | {scores['accuracy']} | "
                     f"{scores['mixed']} | {scores['one_width']} | {scores['text_order']} | "
                     f"{losses['expert']} | {losses['suboptimal']} | {v.paper} |")
    lines += ["", "| variant | validation exact match at each learning rate (first seed), % | "
                  "learning rate | epochs read | optimizer steps per run | tokens per run |",
              "| --- | --- | ---: | --- | ---: | ---: |"]
    for name, entry in results.items():
        grid = ", ".join(f"{lr:g}: {100 * best_validation(r):.1f}"
                         for lr, r in sorted(entry["grid"].items()))
        epochs = ", ".join(r["chosen"] for r in entry["runs"])
        steps = [r["steps"] for r in entry["runs"]]
        steps = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"
        tokens = statistics.mean(r["tokens"] for r in entry["runs"])
        lines.append(f"| {name} | {grid} | {entry['lr']:g} | {epochs} | {steps} | {tokens:,.0f} |")
    n = rows[runner.arm.variants[0]][0]["scores"]["prompts"]
    spread = f"mean ± standard deviation over {cfg.seeds} seeds" if cfg.seeds > 1 else "one seed"
    return "\n".join(lines) + (
        f"\n\nArm {cfg.arm}: {runner.arm.about}. Greedy exact match on {n} held-out prompts, "
        f"{spread}, each run read at the epoch of its best validation score; learning rates "
        f"chosen on the first seed from {cfg.lrs}. *Answers in the sub-optimal source's text "
        f"order, among the prompts where that order is wrong. Losses: mean cross-entropy per "
        f"answer token (nats) of the held-out prompts' expert and sub-optimal answers, each under "
        f"the condition its class had in the variant's training. Wall time "
        f"{seconds / 60:.1f} min.\n")


def base_table(base: dict) -> str:
    kinds = list(base["skills"])
    return (f"\nThe base before fine-tuning: held-out loss {base['held_out_loss']:.3f} nats per "
            f"token on its corpus; greedy accuracy on fresh lists of 3-5 numbers ({base['lists']} "
            f"lists):\n\n| " + " | ".join(kinds) + " |\n|" + " ---: |" * len(kinds) + "\n| "
            + " | ".join(f"{100 * base['skills'][k]:.1f}" for k in kinds) + " |\n")


def plot(runner: Runner, results: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table has the figures)")
        return
    rows = rows_of(runner, results)
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(14, 4.8))
    names = list(rows)[::-1]
    accuracy = [[100 * r["scores"]["accuracy"] for r in rows[n]] for n in names]
    bars.barh(names, [statistics.mean(a) for a in accuracy],
              xerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accuracy], color="tab:blue")
    bars.set_xlabel("held-out exact match, % (chosen epoch)")
    for name, entry in results.items():
        length = min(len(r["curve"]) for r in entry["runs"])
        mean = [100 * statistics.mean(r["curve"][i]["validation"] for r in entry["runs"])
                for i in range(length)]
        steps = [entry["runs"][0]["curve"][i]["step"] for i in range(length)]
        curves.plot(steps, mean, marker="o", label=name)
    curves.set(xlabel="optimizer step (an export at each epoch's end)",
               ylabel="validation exact match, %")
    curves.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(run_command(AblationConfig, ablation, sys.argv[1:], __doc__))
