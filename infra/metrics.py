"""What a training run reports: every --log-every steps a row of loss (overall and per class),
accuracy, grad norm, tokens/s, MFU, memory and ETA, printed by rank 0 and appended to metrics.jsonl;
the model FLOPs MFU counts; and the per-class weighted loss, which eval.py reports too.

Read top to bottom: the per-class loss; MFU; the log rows.
"""

import json
import resource
import time

import numpy as np
import torch
import torch.distributed as dist

from infra.run_plan import plan_fingerprint
from model import ModelConfig

# --------------------------------------------------------------------------------------------------
# The per-class loss


def class_labels(sources: list[dict]) -> list[str]:
    """Names each class for a log line: its condition, or "class i" where that is empty or shared
    with another class."""
    conditions = [s["condition"] for s in sources]
    return [c if c and conditions.count(c) == 1 else f"class {i}" for i, c in enumerate(conditions)]


def class_shares(meta: dict) -> str:
    """Says each class's conversations and its share of the weighted loss, Σ w of the class over
    Σ w of all (METHOD.md §1): what the run will learn from each source."""
    per_class = meta["splits"]["train"]["per_class"]
    total = sum(c["weight_sum"] for c in per_class)
    return "classes: " + "; ".join(
        f"{label} (weight {source['weight']:g}) {c['conversations']:,} conversations, "
        f"{c['weight_sum'] / total:.1%} of the weighted loss"
        for label, source, c in zip(class_labels(meta["sources"]), meta["sources"], per_class))


def per_class_losses(sums, sources: list[dict]) -> list[dict]:
    """Computes each class's weighted loss Σ w·CE / Σ w (METHOD.md §4's L, one class at a time) from
    its sums, a row [Σ w·CE, Σ w·correct, Σ w] per class (train.add_class_sums); None for a class
    with no supervised token in them."""
    return [{"class": c, "condition": source["condition"], "weight": source["weight"],
             "loss": ce / weight if weight else None}
            for c, (source, (ce, _, weight)) in enumerate(zip(sources, sums))]


# --------------------------------------------------------------------------------------------------
# MFU


def matmul_peak_flops(device) -> float:
    """Measures the bf16 matmul FLOP/s, the denominator of MFU (docs/BENCHMARKS.md); CPU runs
    report no MFU."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start)


def step_flops(config: ModelConfig, lengths) -> float:
    """Counts model FLOPs as MFU counts them (docs/BENCHMARKS.md): 6·N_matmul per token, plus causal
    attention's 6·L·d·T per token of a T-token conversation, forward and backward."""
    c = config
    attention = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    n_matmul = c.n_layers * (attention + 3 * c.dim * c.ffn_dim) + c.dim * c.vocab_size
    lengths = np.asarray(lengths, dtype=np.float64)
    return (6 * n_matmul * lengths.sum()
            + 6 * c.n_layers * c.n_heads * c.head_dim * (lengths ** 2).sum())


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --------------------------------------------------------------------------------------------------
# The log rows


def run_summary(cfg, plan, peak_lr: float, world: int, device, compute_dtype) -> str:
    """Says the run in one line: its processes, its data and plan, its learning rate."""
    threads = f" ({torch.get_num_threads()} thread(s) each)" if device.type == "cpu" else ""
    sharding = f"HSDP {cfg.replicate} x {world // cfg.replicate}" if cfg.replicate > 1 else "FSDP"
    return (f"{world} rank(s) on {device.type}{threads}, {sharding}, {compute_dtype}; "
            f"{len(plan.conversation_weight):,} conversations; {plan.total_steps:,} optimizer "
            f"steps of {world * cfg.grad_accum} x {cfg.batch_max_len:,} tokens "
            f"({plan.supervised_per_step:,.0f} supervised tokens per step); peak lr {peak_lr:.3g}; "
            f"plan {plan_fingerprint(plan)}"
            + (f", the same on all {world} ranks" if world > 1 else ""))


class MetricsLog:
    """The log rows of a run, each summed over every rank since the previous row."""

    def __init__(self, sources: list[dict], plan, lengths, config: ModelConfig, log_every: int,
                 device, log, start_step: int, file):
        self.sources = sources
        self.labels = class_labels(sources)
        self.plan = plan
        self.lengths = lengths  # of each conversation
        self.config = config
        self.log_every = log_every
        self.peak_flops = matmul_peak_flops(device)
        self.device = device
        self.log = log
        self.file = file
        self.run_start = time.perf_counter()
        self.start_step = start_step
        self.reset()

    def reset(self):
        self.sums = torch.zeros(len(self.sources), 3, dtype=torch.float64, device=self.device)
        self.tokens = self.supervised = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def after_step(self, position, bins, sums, lr: float, grad_norm, stop: bool):
        """Adds a step's sums (train.class_sums of this rank's micro-batches) and its bins' tokens,
        then writes a row if one is due: every log_every steps, at the run's end, on a stop."""
        self.sums += sums
        lengths = self.lengths[[i for b in bins for i in b]]
        self.tokens += int(lengths.sum())
        self.supervised += int(sum(self.plan.conversation_supervised[b].sum() for b in bins))
        self.flops += step_flops(self.config, lengths)
        if position.step % self.log_every == 0 or position.step == self.plan.total_steps or stop:
            self.write_row(position, lr, grad_norm)

    def write_row(self, position, lr: float, grad_norm):
        sums = self.sums.clone()
        dist.all_reduce(sums)  # the logged figures cover every rank
        elapsed = time.perf_counter() - self.start
        seconds_per_step = ((time.perf_counter() - self.run_start)
                            / (position.step - self.start_step))
        ce, correct, weight = sums.sum(0).tolist()
        mfu = None
        if self.peak_flops:
            mfu = self.flops / elapsed / self.peak_flops / dist.get_world_size()
        row = {"step": position.step, "epoch": position.epoch + 1, "lr": lr, "loss": ce / weight,
               "accuracy": correct / weight,
               "loss_per_class": per_class_losses(sums.tolist(), self.sources),
               "grad_norm": float(grad_norm), "tokens_per_s": self.tokens / elapsed,
               "supervised_tokens_per_s": self.supervised / elapsed, "mfu": mfu,
               "peak_memory_gib": peak_memory_gib(self.device),
               "eta_s": (self.plan.total_steps - position.step) * seconds_per_step}
        self.log(self.line(row), flush=True)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.reset()

    def line(self, row: dict) -> str:
        per_class = ", ".join(f"{label} {c['loss']:.3f}" for label, c in
                              zip(self.labels, row["loss_per_class"]) if c["loss"] is not None)
        return (f"step {row['step']}/{self.plan.total_steps} | epoch {row['epoch']} | "
                f"lr {row['lr']:.2e} | loss {row['loss']:.4f} ({per_class}) | "
                f"acc {row['accuracy']:.1%} | grad "
                f"{row['grad_norm']:.2f} | {row['tokens_per_s']:,.0f} tok/s "
                f"({row['supervised_tokens_per_s']:,.0f} supervised) | "
                + (f"MFU {row['mfu']:.1%} | " if row["mfu"] is not None else "")
                + f"mem {row['peak_memory_gib']:.2f} GiB | ETA {row['eta_s']:.0f}s")

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        if self.file:
            self.file.close()
