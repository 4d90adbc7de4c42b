"""C-RLFT training (Wang et al., arXiv 2309.11235) under FSDP2, one code path for one process and
for torchrun. What the method is, in four lines, and where each is done:
  1. Each source of conversations is a class with a condition and a weight (1.0 for the expert, 0.1
     for the sub-optimal one): the condition is written into every role prefix, and each answer
     token carries its class's weight (data.py, the method's first hop).
  2. A token's loss is its weight times its cross-entropy, Σ w·CE (model.py, the second hop).
  3. A step's loss is Σ w·CE / Σ w over every rank and micro-batch of the step, exactly: each rank
     divides by the step's global Σ w, and the ranks' gradients are summed (§5 here, the third hop).
  4. At inference the model is prompted with the expert's condition (sample.py).

  torchrun --nproc_per_node=8 train.py --preset=openchat-13b --base=Llama-2-13b-hf --data=data/mine
  python train.py            # the demo's C-RLFT run (`python demo.py` makes its data and base)
  python train.py --help     # every option, with its default (a preset's values when given)

Read top to bottom:
  1. TrainConfig and the recipes (METHOD.md §7).
  2. The parallelism: activation checkpointing, compile, fully_shard per block, then the root.
  3. The model: from scratch, or from a Hugging Face base with new and untrained rows at the mean.
  4. The batch and the learning rate.
  5. The step: Σ w·CE / Σ w over the whole step (METHOD.md §4).
  6. The loop, where checkpoints, exports, the log and stop signals are a line each, and main.
The machinery is in infra/: the job's processes and signals (job.py), the run's plan (run_plan.py),
checkpoints (checkpoint.py), exports (exports.py), Hugging Face files (hf.py), the log (metrics.py).
"""

import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import data
from infra.checkpoint import Checkpointer, check_run_directory
from infra.cli import arg, check_ranges, parse
from infra.exports import Exporter
from infra.files import check_writable_folder, write_json
from infra.hf import (load_weights, mean_untrained_template_rows, read_config,
                      vocabulary_rows)
from infra.job import (JobError, StopRequests, Stopped, check_same_on_every_rank, end_job,
                       gather_from_ranks, on_every_rank, rank_prefix, set_cpu_threads,
                       silence_expected_warnings, start_job)
from infra.metrics import MetricsLog, class_shares, run_summary
from infra.run_plan import Position, plan_fingerprint, plan_run
from model import MODELS, ModelConfig, Transformer, default_device, default_dtype

# --------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class TrainConfig:
    preset: str = arg("demo", "recipe whose values become the other flags' defaults (RECIPES)")
    data: str = arg("", "dataset directory made by `python data.py prepare`")
    base: str = arg("", "Hugging Face folder of the base model; empty: from scratch, with --model")
    model: str = arg("demo", "model shape when training from scratch (model.py MODELS)")
    out: str = arg("runs/demo", "run directory: metrics.jsonl, checkpoints/, exports/")
    epochs: int = arg(5, "passes over the data")
    max_steps: int = arg(0, "stop after this many optimizer steps in all (0: every epoch)")
    batch_max_len: int = arg(4096, "tokens in one packed stream: one rank's micro-batch")
    grad_accum: int = arg(1, "micro-batches per rank in one optimizer step")
    lr: float = arg(1.5e-3, "peak learning rate; 0: METHOD.md §7's rule 3e-4 * sqrt(S / 4e6) * "
                            "lr_scale, S a step's tokens (ranks x micro-batches x batch_max_len) x "
                            "the data's supervised share")
    lr_scale: float = arg(1.0, "factor on the automatic learning rate (the reference: 1/6 "
                               "Mistral, 1/5.3 Llama-3)")
    warmup: float = arg(0.05, "fraction of the steps with a linear warm-up")
    min_lr: float = arg(0.1, "the cosine ends at this fraction of the peak learning rate")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices and embeddings, not norm gains)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    eps: float = arg(1e-5, "AdamW epsilon")
    grad_clip: float = arg(1.0, "gradient norm clip (0: none)")
    loss: str = arg("fused", "the weighted loss Σ w·CE: fused (never holds the [N, V] logits) or "
                             "plain (from the full logits: the formula, for loss ablations)")
    dtype: str = arg("auto", "compute dtype: bfloat16 or float32; auto: bfloat16 on a GPU, float32 "
                             "on a CPU")
    activation_checkpointing: bool = arg(False, "recompute each block's activations in backward")
    compile: bool = arg(False, "torch.compile each block")
    mean_untrained_rows: bool = arg(True, "a template token's rows a base never trained (Llama-3's "
                                          "<|eot_id|>, header tokens) start at the mean of its "
                                          "ordinary rows, as the reference's; false: as they are")
    vocab_multiple: int = arg(0, "embedding and output-head rows in memory: the vocabulary rounded "
                                 "up to a multiple of this (aligned matmuls; exports keep the "
                                 "vocabulary's size); 0: 64 on a GPU, 1 on a CPU")
    threads: int = arg(0, "CPU threads per process; 0: $OMP_NUM_THREADS if set (torchrun sets 1), "
                          "else the cores idle at start")
    seed: int = arg(0, "seed of the initialisation and of the packing shuffles")
    log_every: int = arg(10, "optimizer steps between log rows")
    save_every: int = arg(0, "optimizer steps between resumable checkpoints (0: at each epoch's "
                             "end only)")
    keep_last: int = arg(0, "keep only the newest K resumable checkpoints (0: keep all)")
    resume: bool = arg(False, "continue from the newest complete checkpoint in --out, on any "
                              "number of ranks")
    replicate: int = arg(1, "HSDP: the ranks in R groups (R divides them; a group per node, say), "
                            "each sharding the model, the groups replicating it; 1: FSDP")
    dist_timeout: float = arg(1800.0, "seconds a rank waits for the others: to form the job, and "
                                      "in any collective (a 13B checkpoint takes minutes)")
    export_dtype: str = arg("bfloat16", "dtype of the Hugging Face exports")


RECIPES = {
    # The demo's C-RLFT run on a CPU (python demo.py makes its data and base): the field defaults.
    "demo": dict(data="data/demo/dataset", base="runs/demo-base/exports/epoch-1"),
    # The paper's model (METHOD.md §7): Llama-2-13B, 8 GPUs × 32,768 packed tokens (8 × 4096), 5
    # epochs, AdamW (0.9, 0.95), eps 1e-5, wd 0.1, clip 1.0, 5% warm-up, cosine to 10%, automatic
    # lr.
    "openchat-13b": dict(model="Llama-2-13B", out="runs/openchat-13b", batch_max_len=32768, lr=0.0,
                         activation_checkpointing=True, log_every=1),
    # OpenChat 3.5 on Mistral-7B: the same recipe at the reference README's 77,824 tokens per GPU,
    # the automatic learning rate divided by 6.
    "mistral-7b": dict(model="Mistral-7B", out="runs/mistral-7b", batch_max_len=77824, lr=0.0,
                       lr_scale=1 / 6, activation_checkpointing=True, log_every=1),
    # OpenChat 3.6 on Llama-3-8B (data prepared with --template=openchat_3.6): 40,960 tokens per
    # GPU, divided by 5.3.
    "llama-3-8b": dict(model="Llama-3-8B", out="runs/llama-3-8b", batch_max_len=40960, lr=0.0,
                       lr_scale=1 / 5.3, activation_checkpointing=True, log_every=1),
    # Qwen2.5-7B (data prepared with its tokenizer.json and --template=openchat_3.5): no reference
    # recipe; Llama-3's, a base of as many pretraining tokens (our estimate, METHOD.md §7).
    "qwen2.5-7b": dict(model="Qwen2.5-7B", out="runs/qwen2.5-7b", batch_max_len=40960, lr=0.0,
                       lr_scale=1 / 5.3, activation_checkpointing=True, log_every=1),
}


def load_config(argv) -> TrainConfig:
    """Parses the flags: --preset first, then every other flag over the preset's values."""
    preset = parse(TrainConfig, argv, __doc__).preset
    if preset not in RECIPES:
        raise SystemExit(f"unknown preset {preset!r}; presets: {', '.join(RECIPES)}")
    return parse(TrainConfig, argv, __doc__, defaults=replace(TrainConfig(), **RECIPES[preset]))



def check_config(cfg: TrainConfig):
    """Refuses flag values no run can use, each named with its meaning, before any process group."""
    check_ranges(cfg, {
        "epochs": cfg.epochs >= 1, "max_steps": cfg.max_steps >= 0,
        "batch_max_len": cfg.batch_max_len >= 2, "grad_accum": cfg.grad_accum >= 1,
        "lr": 0 <= cfg.lr < math.inf, "lr_scale": 0 < cfg.lr_scale < math.inf,
        "warmup": 0 <= cfg.warmup <= 1, "min_lr": 0 <= cfg.min_lr <= 1,
        "weight_decay": 0 <= cfg.weight_decay < math.inf, "beta1": 0 <= cfg.beta1 < 1,
        "beta2": 0 <= cfg.beta2 < 1, "eps": 0 < cfg.eps < math.inf,
        "grad_clip": 0 <= cfg.grad_clip < math.inf, "loss": cfg.loss in ("fused", "plain"),
        "dtype": cfg.dtype in ("auto", "bfloat16", "float32"), "model": cfg.model in MODELS,
        "vocab_multiple": cfg.vocab_multiple >= 0, "threads": cfg.threads >= 0,
        "log_every": cfg.log_every >= 1, "save_every": cfg.save_every >= 0,
        "keep_last": cfg.keep_last >= 0, "dist_timeout": 0 < cfg.dist_timeout < math.inf,
        "replicate": cfg.replicate >= 1
        and int(os.environ.get("WORLD_SIZE", 1)) % cfg.replicate == 0,
        "export_dtype": cfg.export_dtype in ("bfloat16", "float16", "float32")})


# --------------------------------------------------------------------------------------------------
# 2. Parallelism


def make_mesh(device, world: int, replicate: int):
    """Lays the ranks out. FSDP: one mesh dimension, every rank holds 1/world of each parameter.
    HSDP (replicate R): R × world/R, each group of world/R ranks (a node, laid out so by torchrun's
    consecutive ranks) shards the model and the R groups replicate it: the parameters' all-gathers
    and the gradients' reduce-scatters stay inside a group, and only an all-reduce of each group's
    shard crosses between groups."""
    if replicate == 1:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (replicate, world // replicate),
                            mesh_dim_names=("replicate", "shard"))


def parallelize(model: Transformer, mesh, cfg: TrainConfig, compute_dtype):
    """Applies, in a fixed order as torchtitan does: activation checkpointing, per-block compile,
    fully_shard per block, then the root (embeddings, final norm, output head). Parameters,
    gradients' reduction and the optimizer state stay float32 and sharded; forward and backward
    compute in compute_dtype. The ranks' gradients are summed: see sum_gradients_over_ranks."""
    # cast_forward_inputs=False: FSDP2 would otherwise cast the root's floating inputs, the target
    # weights, to the compute dtype (0.1 → 0.10009765625 in bf16), and the loss would no longer be
    # Σ w·CE / Σ w. The blocks' inputs are in the compute dtype already (the embedding's output).
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in model.layers:
        if cfg.activation_checkpointing:
            activation_checkpoint(block)  # the composable form keeps the checkpoint's names
        if cfg.compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    sum_gradients_over_ranks(model)


# --------------------------------------------------------------------------------------------------
# 3. The model


def build_model(cfg: TrainConfig, meta: dict, mesh, device, compute_dtype,
                log=lambda *a, **k: None) -> Transformer:
    """Builds the sharded model. From scratch: initialised whole on every rank with the same seed
    (small models: the demo), then sharded. From a base: built on the meta device, sharded, and each
    rank reads its own rows of every tensor (a 13B base is read once per node, not once per rank);
    the rows of the template's new tokens start as the mean of the base's rows (which rows they are:
    infra/hf.py's vocabulary_rows), and so do the base's own rows of template tokens it never
    trained (METHOD.md §2)."""
    vocab_multiple = cfg.vocab_multiple or (64 if device.type == "cuda" else 1)
    if not cfg.base:
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_name(cfg.model, vocab_multiple=vocab_multiple,
                                                  vocab_size=meta["tokenizer"]["vocab_size"]))
        parallelize(model, mesh, cfg, compute_dtype)  # fully_shard moves each shard to the device
        return model
    base = Path(cfg.base)
    tokenizer = data.Tokenizer(Path(cfg.data) / meta["tokenizer"]["file"], meta["template"])
    config = read_config(base)
    rows, mean_rows = vocabulary_rows(base, config.vocab_size, tokenizer, from_base=True)
    with torch.device("meta"):
        model = Transformer(replace(config, vocab_size=rows, vocab_multiple=vocab_multiple))
    # A tied output head is the embedding itself: one parameter of the root's FSDP group, its
    # gradient the sum of both uses. fully_shard and to_empty keep the tie (FSDP2 swaps parameters
    # in place).
    parallelize(model, mesh, cfg, compute_dtype)
    model.to_empty(device=device)
    load_weights(model, base, config.vocab_size, mean_rows)
    if cfg.mean_untrained_rows:
        mean_untrained_template_rows(model, tokenizer,
                                     min(config.vocab_size, tokenizer.base_vocab_size), log)
    return model


# --------------------------------------------------------------------------------------------------
# 4. The batch and the learning rate


@dataclass
class Batch:
    """One rank's packed stream for one micro-batch, on the device."""
    tokens: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    targets: torch.Tensor
    target_weights: torch.Tensor
    classes: torch.Tensor
    supervised: torch.Tensor  # the tokens with w ≠ 0: the loss needs no host sync to find them


def load_data(path) -> tuple[dict, data.Split]:
    """Reads a dataset's meta.json and its train split, which must hold a conversation."""
    meta, split = data.load_meta(path), data.load_split(path, "train")
    if not len(split.lengths):
        raise ValueError(f"{path}: the train split has no conversations")
    return meta, split


def make_batch(split: data.Split, conversations: list[int], device) -> Batch:
    """Packs the conversations into one stream (data.pack_stream) and puts its arrays on the
    device: pinned and copied asynchronously on a GPU (no host sync)."""
    s = data.pack_stream(split, conversations)

    def to(array, dtype):
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(device, non_blocking=True)

    return Batch(tokens=to(s["tokens"], torch.long), positions=to(s["positions"], torch.long),
                 cu_seqlens=to(s["cu_seqlens"], torch.int32),
                 max_seqlen=int(np.diff(s["cu_seqlens"]).max()),
                 targets=to(s["targets"], torch.long),
                 target_weights=to(s["target_weights"], torch.float32),
                 classes=to(s["classes"], torch.long),
                 supervised=to(np.flatnonzero(s["target_weights"]), torch.long))


def step_supervised_tokens(split: data.Split, cfg: TrainConfig, world: int) -> float:
    """Estimates S of METHOD.md §7 as the reference's calculate_auto_lr does: a step's capacity in
    tokens times the share of the data's tokens that are supervised."""
    share = np.count_nonzero(split.target_weights) / len(split.target_weights)
    return cfg.batch_max_len * world * cfg.grad_accum * share


def auto_lr(supervised_tokens_per_step: float, scale: float = 1.0) -> float:
    """Returns METHOD.md §7's peak learning rate, 3e-4 · sqrt(S / 4e6), S the supervised tokens of
    one optimizer step (the paper: ~200k → 6.7e-5)."""
    return 3e-4 * math.sqrt(supervised_tokens_per_step / 4e6) * scale


def learning_rate(step: float, total_steps: float, peak: float, cfg: TrainConfig) -> float:
    """Returns the rate at a step of the schedule: a linear warm-up over cfg.warmup of the steps,
    then a cosine down to cfg.min_lr of the peak."""
    warmup = max(1, round(cfg.warmup * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------
# 5. The step (METHOD.md §4)


def conversation_weights(split: data.Split) -> np.ndarray:
    """Sums the target weights of each conversation of the split, in float64, once per run."""
    return np.add.reduceat(np.asarray(split.target_weights, dtype=np.float64), split.offsets)


def step_weight_sum(conversation_weight: np.ndarray, bins: list[list[int]]) -> float:
    """Returns the denominator of METHOD.md §4: Σ w over every conversation of one optimizer step,
    the bins of every rank and micro-batch. Every rank has the whole plan, so every rank knows it
    without a collective."""
    return float(sum(conversation_weight[b].sum() for b in bins))


def forward_backward(model, batches: list[Batch], weight_sum: float, n_classes: int,
                     loss: str = "fused") -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagates this rank's share of one optimizer step's loss. METHOD.md §4:
    L = Σ_t w_t·CE_t / Σ_t w_t, both sums over every rank and micro-batch of the step. weight_sum
    is that global Σ w = W, known from the plan on every rank, so each micro-batch back-propagates
    its own Σ w·CE / W with no collective and no host sync, and the gradients add up:
        rank r, micro-batch m:        ∇ Σ_{t in (r, m)} w_t·CE_t / W
        summed over m (here) and r:   ∇ Σ_t w_t·CE_t / W = ∇L
    over the micro-batches in each parameter's .grad, over the ranks in FSDP's reduce-scatter, which
    must sum, not average (sum_gradients_over_ranks). Returns this rank's per-class sums
    (add_class_sums), for the log, and Σ w·CE per micro-batch."""
    sums = torch.zeros(n_classes, 3, dtype=torch.float64, device=batches[0].tokens.device)
    losses = []
    for b in batches:
        loss_sum, ce, correct = model(b.tokens, b.positions, cu_seqlens=b.cu_seqlens,
                                      max_seqlen=b.max_seqlen, targets=b.targets,
                                      target_weights=b.target_weights, supervised=b.supervised,
                                      loss=loss)
        (loss_sum / weight_sum).backward()
        add_class_sums(sums, b, ce, correct)
        losses.append(loss_sum.detach())
    return sums, torch.stack(losses)


def sum_gradients_over_ranks(model):
    """Makes FSDP2 sum the ranks' gradients where it would average them: each rank's loss is
    already divided by the step's global Σ w (forward_backward), so their sum is ∇L. A plain SUM
    (gloo has no PreMulSum); under HSDP both the reduce-scatter and the all-reduce across the
    replicas sum."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def add_class_sums(sums: torch.Tensor, batch: Batch, ce, correct):
    """Adds a batch's [Σ w·CE, Σ w·correct, Σ w] of each class to sums [classes, 3], float64: what
    the per-class losses of the log and of eval.py are made of (infra/metrics.py)."""
    w = batch.target_weights
    per_token = torch.stack([w * ce.float(), w * correct.float(), w], dim=1)
    sums.index_add_(0, batch.classes, per_token.double())


def make_optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """Makes AdamW with weight decay on the matrices and embeddings, not on the norm gains. foreach:
    the sharded (DTensor) parameters would otherwise take the per-parameter loop (twice the
    optimizer time measured for the demo model on the CPU)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def optimizer_step(model, optimizer, batches: list[Batch], weight_sum: float, n_classes: int,
                   grad_clip: float, loss: str = "fused"):
    """Takes one optimizer step: forward_backward, the gradient norm clipped, and the update,
    applied only when the norm is finite (one host sync per step): a non-finite loss changes
    nothing. Returns forward_backward's sums and losses, and the norm."""
    sums, losses = forward_backward(model, batches, weight_sum, n_classes, loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, losses, grad_norm


def non_finite_loss(position: Position, my_streams, losses) -> JobError:
    """Makes the error for a step whose gradient norm is not finite, naming every rank's culprits.
    """
    bad = [f"micro-batch {i + 1} (conversations {b})"
           for i, (b, loss) in enumerate(zip(my_streams, losses.tolist()))
           if not math.isfinite(loss)]
    culprits = [f"rank {r}: " + ", ".join(theirs) for r, (theirs, _) in
                enumerate(gather_from_ranks(bad)) if theirs]
    return JobError(
        f"non-finite loss at step {position.step + 1} (epoch {position.epoch + 1}, step "
        f"{position.step_in_epoch + 1} of the epoch)"
        + ("; " + "; ".join(culprits) if culprits else "")
        + "; no update was applied; the last checkpoint is intact: fix the data or the settings, "
          "then --resume")


# --------------------------------------------------------------------------------------------------
# 6. The loop


def train(cfg: TrainConfig, stop_requests: StopRequests | None = None):
    """Runs the whole run in an initialised process group: the inputs checked on every rank, the
    model built, the plan made (from the newest checkpoint with --resume), then the steps. Returns
    the model and its last export. With `stop_requests`, a SIGTERM or SIGINT ends the run after the
    step under way, with a checkpoint (Stopped)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device, out = default_device(), Path(cfg.out)
    log = print if rank == 0 else (lambda *a, **k: None)
    # Every rank has looked (gathered) before rank 0 writes config.json.
    meta, split, data_sha = on_every_rank(lambda: read_inputs(cfg))
    check_same_on_every_rank({"dataset (meta.json's sha256)": data_sha})
    compute_dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else default_dtype(device)
    model = build_model(cfg, meta, make_mesh(device, world, cfg.replicate), device, compute_dtype,
                        log)
    optimizer = make_optimizer(model, cfg, cfg.lr)  # its learning rate is set at every step
    checkpoints = Checkpointer(out, model, optimizer, cfg.save_every, cfg.keep_last)
    exports = Exporter(out, model, meta, cfg.data, cfg.export_dtype)
    saved = checkpoints.load_newest(len(split.lengths), log) if cfg.resume else None
    plan = plan_run(split, cfg, conversation_weights(split), world, saved)
    check_same_on_every_rank({"plan": plan_fingerprint(plan)})
    peak_lr = cfg.lr or (saved and saved.peak_lr) or auto_lr(
        step_supervised_tokens(split, cfg, world), cfg.lr_scale)
    start = saved.position if saved else Position()
    if saved:  # what changed with the world size said, a half-written export written again
        checkpoints.finish_resuming(saved, plan, cfg.grad_accum, exports, log)
    if start.step >= plan.total_steps:
        log(f"{out} is complete ({start.step} of {plan.total_steps} steps): nothing to do")
        return model, exports.newest()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**asdict(cfg), "dataset_meta_sha256": data_sha})
    log(run_summary(cfg, plan, peak_lr, world, device, compute_dtype))
    log(class_shares(meta))
    metrics = MetricsLog(meta["sources"], plan, split.lengths, model.config, cfg.log_every,
                         device, log, start.step,
                         open(out / "metrics.jsonl", "a") if rank == 0 else None)
    with metrics:
        run_steps(model, optimizer, split, plan, start, peak_lr, cfg, checkpoints, exports,
                  metrics, stop_requests)
    log(f"\ndone: {plan.total_steps} steps in {time.perf_counter() - metrics.run_start:.0f}s. The "
        f"model: {exports.last}\n  sample:   python sample.py --checkpoint {exports.last}\n"
        f"  evaluate: python eval.py loss --checkpoint {exports.last} --data {cfg.data}")
    return model, exports.last


def run_steps(model, optimizer, split, plan, start: Position, peak_lr: float, cfg: TrainConfig,
              checkpoints: Checkpointer, exports: Exporter, metrics: MetricsLog,
              stop_requests: StopRequests | None):
    """Runs the loop: the plan's steps from `start`, each followed by its log row, checkpoint and
    export when due. A stop request ends the run after the step it came in, logged and checkpointed.
    """
    rank, device = dist.get_rank(), default_device()
    n_classes = len(metrics.sources)
    for position, bins in plan.steps(start):
        schedule = plan.schedule
        lr = learning_rate(schedule.schedule_step(position.step),
                           schedule.schedule_step(plan.total_steps), peak_lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        my_streams = bins[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
        batches = [make_batch(split, b, device) for b in my_streams]
        sums, losses, grad_norm = optimizer_step(
            model, optimizer, batches, step_weight_sum(plan.conversation_weight, bins), n_classes,
            cfg.grad_clip, cfg.loss)
        if not torch.isfinite(grad_norm):  # on every rank: the norm is global
            raise non_finite_loss(position, my_streams, losses)
        done = position.after_step()
        stop = stop_requests.agreed(device) if stop_requests else 0  # the same on every rank
        metrics.after_step(done, bins, sums, lr, grad_norm, stop)
        checkpoints.after_step(done, plan, peak_lr, cfg.grad_accum, stop)
        exports.after_step(done, plan)
        if stop and done.step < plan.total_steps:
            raise Stopped(stop, done.step, plan.total_steps, checkpoints.folder)


def read_inputs(cfg: TrainConfig) -> tuple[dict, data.Split, str]:
    """Reads the dataset and its meta.json's hash, and checks the run directory against them; a
    missing input is one line that says how to make it."""
    check_writable_folder(Path(cfg.out).parent)
    if not cfg.data:
        raise FileNotFoundError(f"--data is required with --preset={cfg.preset}")
    needed = [Path(cfg.data) / "meta.json"] + ([Path(cfg.base) / "config.json"] if cfg.base else [])
    for path in needed:
        if not path.exists():
            hint = " (`python demo.py` makes the demo's data and base)"
            raise FileNotFoundError(f"{path} is missing" + (hint if cfg.preset == "demo" else ""))
    meta, split = load_data(cfg.data)
    data_sha = hashlib.sha256((Path(cfg.data) / "meta.json").read_bytes()).hexdigest()
    check_run_directory(Path(cfg.out), cfg.resume, cfg.data, data_sha)
    return meta, split, data_sha


def main(argv):
    cfg = load_config(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        check_config(cfg)
    except ValueError as e:  # the same flags on every rank: rank 0 says it
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not torch.cuda.is_available():
        set_cpu_threads(cfg.threads)
    silence_expected_warnings()
    try:
        start_job(cfg.dist_timeout)
        train(cfg, StopRequests())
    except Stopped as e:  # every rank together, after the same step: a clean end
        if rank0:
            print(str(e), flush=True)
        end_job()
        sys.exit(128 + e.signum)  # what a shell reports for a process the signal ended
    except KeyboardInterrupt:  # a second Ctrl-C
        if rank0:
            print(f"interrupted: stopped at once; the newest complete checkpoint in "
                  f"{cfg.out}/checkpoints is where --resume continues", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except JobError as e:  # found together (the inputs, a checkpoint, the loss): one line
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (ValueError, OSError) as e:  # this rank's alone: it says so, and which it is
        print(f"error: {rank_prefix()}{e}", file=sys.stderr, flush=True)
        sys.exit(1)
    end_job()  # only after success: after an error another rank may be in a collective


if __name__ == "__main__":
    main(sys.argv[1:])
