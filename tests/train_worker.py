"""Started by tests/test_train.py, alone or under torchrun (gloo on CPU):

  train_worker.py step DATA      the gradient of one optimizer step equals ∇L of METHOD.md §4, in float64
  train_worker.py losses DATA    --loss=plain and --loss=fused give one step the same loss and gradient, float64
  train_worker.py hsdp DATA BASE  HSDP (2 × 2) gives FSDP's gradient over 4 ranks, and that of one float64
                                 process; the collectives of each are those bench.py scale counts; BASE read as
                                 under FSDP
  train_worker.py base DATA BASE [MULTIPLE]  a Hugging Face base read a slice per rank, new token rows (and
                                             vocabulary padding rows) at the mean
  train_worker.py tied DATA BASE  a base with tied embeddings: one parameter, one gradient, under FSDP2
  train_worker.py untrained DATA BASE...  Llama-3-shaped bases: template rows never trained set to the reference's
                                          mean, a trained base read bit for bit
  train_worker.py bf16 DATA       under a bf16 policy the token weights reach the loss in float32, exact
  train_worker.py state DATA      bench.py scale's sharded parameters, gradients and AdamW moments, as held
  train_worker.py export DATA OUT a short run's export gives the trained model's logits, in ours and transformers
  train_worker.py record FILE ARGS  train.py ARGS, each rank appending the conversations of each micro-batch to FILE
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
from infra.hf import load_pretrained  # noqa: E402
from infra.job import end_job, start_job  # noqa: E402
from infra.records import Message  # noqa: E402
from infra.run_plan import pack_epoch  # noqa: E402
from model import ModelConfig, Transformer, weighted_cross_entropy  # noqa: E402

CPU = torch.device("cpu")


def relative_error(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def step_identity(data_dir):
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = train.TrainConfig(data=data_dir, model="tiny", batch_max_len=512, grad_accum=2)
    meta, split = train.load_data(data_dir)
    weight_of = train.conversation_weights(split)

    def rank_sums(bins):
        return [train.step_weight_sum(weight_of, bins[r * cfg.grad_accum:(r + 1) * cfg.grad_accum])
                for r in range(world)]

    # Of the first epoch's optimizer steps (world × 2 streams each), the one whose ranks differ most in Σ w.
    bins = max(pack_epoch(split, cfg, world, epoch=0), key=lambda s: max(rank_sums(s)) / min(rank_sums(s)))
    assert max(rank_sums(bins)) > 1.3 * min(rank_sums(bins)), "the ranks' weight sums should differ"
    mine = bins[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]

    model = train.build_model(cfg, meta, init_device_mesh("cpu", (world,)), CPU, torch.float32)
    n_classes = len(meta["sources"])
    batches = [train.make_batch(split, b, CPU) for b in mine]
    train.forward_backward(model, batches, train.step_weight_sum(weight_of, bins), n_classes)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    for name, reference in float64_gradient(cfg, meta, split, bins).items():
        err = relative_error(grads[name], reference)
        assert err < 1e-5, f"{name}: gradient off by {err:.2e}"
    print(f"rank {rank}: normalisation identity holds (rank weight sums {rank_sums(bins)})", flush=True)


def float64_gradient(cfg, meta, split, bins) -> dict:
    """METHOD.md §4 directly: one float64 model, every stream of the step, ∇ of Σ w·CE / Σ w from the full
    logits."""
    torch.manual_seed(cfg.seed)
    reference = Transformer(ModelConfig.from_name(cfg.model, vocab_size=meta["tokenizer"]["vocab_size"])).double()
    numerator, denominator = 0, 0
    for b in bins:
        batch = train.make_batch(split, b, CPU)
        logits = reference(batch.tokens, batch.positions, batch.cu_seqlens)
        w = batch.target_weights.double()
        numerator = numerator + weighted_cross_entropy(logits, batch.targets, w)[0]
        denominator += w.sum().item()
    (numerator / denominator).backward()
    return {n: p.grad for n, p in reference.named_parameters()}


def plain_and_fused(data_dir):
    """--loss=plain and --loss=fused through train.py's step in float64, each rank two micro-batches of one step:
    the same Σ w·CE per micro-batch, the same per-class sums, and the same gradient, summed over the ranks. To 1e-7,
    not float64's 1e-15: the model normalises in float32 (RMSNorm, as the reference Llama), and two forward passes
    of two model instances may round one element apart there (seen once: 5e-9 relative, in a CI run)."""
    from torch.distributed.fsdp import fully_shard
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = train.TrainConfig(data=data_dir, model="tiny", batch_max_len=512, grad_accum=2)
    meta, split = train.load_data(data_dir)
    bins = pack_epoch(split, cfg, world, epoch=0)[0]
    weight_sum = train.step_weight_sum(train.conversation_weights(split), bins)
    batches = [train.make_batch(split, b, CPU) for b in bins[rank * 2:rank * 2 + 2]]
    results = {}
    for loss in ("plain", "fused"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny", vocab_size=meta["tokenizer"]["vocab_size"])).double()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train.sum_gradients_over_ranks(model)
        sums, losses = train.forward_backward(model, batches, weight_sum, len(meta["sources"]), loss)
        results[loss] = sums, losses, {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    (plain_sums, plain_losses, plain_grads), (sums, losses, grads) = results["plain"], results["fused"]
    torch.testing.assert_close(plain_losses, losses, rtol=1e-7, atol=0)
    torch.testing.assert_close(plain_sums, sums, rtol=1e-7, atol=1e-12)
    for name, grad in grads.items():
        assert relative_error(plain_grads[name], grad) < 1e-7, name
    print(f"rank {rank}: plain and fused loss agree", flush=True)


def counted_collectives(work) -> dict:
    """Elements of the collectives FSDP2 runs in work(), whole: each all-gather's output, each reduce-scatter's
    input, each all-reduce's tensor."""
    import inspect
    counted = {"all-gather": 0, "reduce-scatter": 0, "all-reduce": 0}
    originals = {}
    for name, what, argument in (("all_gather_single", "all-gather", "output_tensor"),
                                 ("reduce_scatter_single", "reduce-scatter", "input"),
                                 ("all_reduce", "all-reduce", "tensor")):
        original = originals[name] = getattr(dist, name)

        def counting(*args, _original=original, _what=what, _argument=argument, **kwargs):
            counted[_what] += inspect.signature(_original).bind(*args, **kwargs).arguments[_argument].numel()
            return _original(*args, **kwargs)
        setattr(dist, name, counting)
    try:
        work()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return counted


def hsdp_gradient(data_dir, base_dir):
    """One step's bins, 4 streams, one per rank: under FSDP (one mesh dimension of 4) and under HSDP (2 groups
    of 2, replicated), the same gradient, and that of one float64 process; each one's collectives as many
    elements as bench.py scale counts (within FSDP2's padding of each parameter to the group's size)."""
    from tools import bench
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = train.TrainConfig(data=data_dir, model="tiny", batch_max_len=512)
    meta, split = train.load_data(data_dir)
    bins = pack_epoch(split, cfg, world, epoch=0)[0]
    weight_sum = train.step_weight_sum(train.conversation_weights(split), bins)
    grads = {}
    for replicate in (1, 2):
        model = train.build_model(cfg, meta, train.make_mesh(CPU, world, replicate), CPU, torch.float32)
        batch = train.make_batch(split, bins[rank], CPU)
        counted = counted_collectives(lambda: train.forward_backward(model, [batch], weight_sum, len(meta["sources"])))
        for what, predicted in bench.collective_elements(model.config, world // replicate, replicate).items():
            assert predicted <= counted[what] <= 1.01 * predicted, (replicate, what, counted[what], predicted)
        grads[replicate] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        shards = {type(p).__name__ for p in model.layers[0].input_layernorm.weight.placements}
        assert shards == ({"Shard"} if replicate == 1 else {"Replicate", "Shard"}), shards
    for name, reference in float64_gradient(cfg, meta, split, bins).items():
        assert relative_error(grads[2][name], grads[1][name]) < 1e-6, name
        assert relative_error(grads[2][name], reference) < 1e-5, name
    print(f"rank {rank}: HSDP gradient = FSDP gradient = float64 gradient", flush=True)
    base_loading(data_dir, base_dir, replicate=2)


def base_loading(data_dir, base_dir, vocab_multiple="1", replicate=1):
    cfg = train.TrainConfig(data=data_dir, base=base_dir, vocab_multiple=int(vocab_multiple))
    meta, _ = train.load_data(data_dir)
    model = train.build_model(cfg, meta, train.make_mesh(CPU, dist.get_world_size(), replicate), CPU, torch.float32)
    base = load_pretrained(base_dir)
    rows, tok = base.config.vocab_size, meta["tokenizer"]
    assert model.config.vocab_size == max(rows, tok["vocab_size"])
    # New tokens: past the base's rows, or in rows the base has past its tokenizer's (Qwen2.5's padding).
    new = [i for i in tok["special_tokens"].values() if i >= tok["base_vocab_size"]]
    loaded = {n: p.full_tensor() for n, p in model.named_parameters()}
    assert len(loaded["lm_head.weight"]) == model.config.padded_vocab_size and model.config.padded_vocab_size % int(vocab_multiple) == 0
    for name, p in base.named_parameters():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            mean = p.double().mean(0).float()
            expected = torch.cat([p.detach(), mean.expand(len(loaded[name]) - rows, -1)])
            expected[[i for i in new if i < rows]] = mean
            torch.testing.assert_close(loaded[name], expected, rtol=0, atol=1e-6)
            assert torch.equal(loaded[name][:min(rows, tok["base_vocab_size"])], p[:tok["base_vocab_size"]])
        else:
            assert torch.equal(loaded[name], p), name
    print(f"rank {dist.get_rank()}: base loaded", flush=True)


def with_new_rows_at_the_mean(model, vocab_size):
    """A whole tied model with rows appended up to vocab_size, each the mean of the rows before (the new EOT row, as
    train.py starts it), written out here rather than through the code under test."""
    weight = model.embed_tokens.weight.detach()
    new = torch.cat([weight, weight.mean(0).expand(vocab_size - len(weight), -1)])
    model.embed_tokens.weight = model.lm_head.weight = torch.nn.Parameter(new)
    return model


def tied_base(data_dir, base_dir):
    world = dist.get_world_size()
    meta, split = train.load_data(data_dir)
    model = train.build_model(train.TrainConfig(data=data_dir, base=base_dir), meta, init_device_mesh("cpu", (world,)),
                              CPU, torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not [n for n, _ in model.named_parameters() if n.startswith("lm_head")]
    reference = with_new_rows_at_the_mean(load_pretrained(base_dir).double(), meta["tokenizer"]["vocab_size"])
    assert reference.lm_head.weight is reference.embed_tokens.weight
    torch.testing.assert_close(model.embed_tokens.weight.full_tensor().double(), reference.embed_tokens.weight,
                               rtol=0, atol=1e-6)
    # Every rank the same micro-batch and the step's Σ w that of all ranks: the ranks' gradients sum to the
    # gradient of this one batch's Σ w·CE / Σ w.
    batch = train.make_batch(split, list(range(6)), CPU)
    weight_sum = batch.target_weights.sum().item()
    train.forward_backward(model, [batch], world * weight_sum, len(meta["sources"]))
    logits = reference(batch.tokens, batch.positions, batch.cu_seqlens)
    (weighted_cross_entropy(logits, batch.targets, batch.target_weights.double())[0] / weight_sum).backward()
    err = relative_error(model.embed_tokens.weight.grad.full_tensor(), reference.embed_tokens.weight.grad)
    assert err < 1e-5, f"the tied gradient is off by {err:.2e}"
    print(f"rank {dist.get_rank()}: tied base loaded, one gradient", flush=True)


def untrained_rows(data_dir, *bases):
    """Each base read under FSDP2: where its rows of <|eot_id|>, <|start_header_id|> and <|end_header_id|> are
    zero, they and their output-head rows become what the reference's init_special_embedding_llama3.py writes,
    torch.mean(rows[:128000] in float32), tied or not, and the log names them; every other row, and every row of
    a base whose rows are trained, bit for bit the base's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta, _ = train.load_data(data_dir)
    tokens = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    ids = [meta["tokenizer"]["special_tokens"][t] for t in tokens]
    for base_dir in bases:
        logged = []
        model = train.build_model(train.TrainConfig(data=data_dir, base=base_dir), meta,
                                  train.make_mesh(CPU, world, 1), CPU, torch.float32, log=logged.append)
        loaded = {n: p.full_tensor() for n, p in model.named_parameters()}
        base = load_pretrained(base_dir)
        untrained = not base.embed_tokens.weight[ids].any()
        for name, p in base.named_parameters():
            expected = p.detach().clone()
            if untrained and name in ("embed_tokens.weight", "lm_head.weight"):
                expected[ids] = torch.mean(p[:128000].to(torch.float32), dim=0)
            torch.testing.assert_close(loaded[name], expected, rtol=0, atol=1e-7 if untrained else 0, msg=name)
        assert len(logged) == untrained and all(t in "".join(logged) for t in tokens if untrained)
    print(f"rank {rank}: untrained rows at the reference's mean", flush=True)


def bf16_weights(data_dir):
    """0.1, the demo's GPT3 weight, is no bf16 number (it would become 0.10009765625): the loss must weigh each
    token's CE by the float32 weight while the model computes in bf16, or Σ w·CE / Σ w is not the loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta, split = train.load_data(data_dir)
    model = train.build_model(train.TrainConfig(data=data_dir, model="tiny"), meta, init_device_mesh("cpu", (world,)),
                              CPU, torch.bfloat16)
    batch = train.make_batch(split, [int(i) for i in (split.classes == 1).nonzero()[0][rank * 4:rank * 4 + 4]], CPU)
    assert batch.target_weights.dtype == torch.float32 and torch.isclose(batch.target_weights.max(), torch.tensor(0.1))
    loss_sum, ce, _ = model(batch.tokens, batch.positions, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                            targets=batch.targets, target_weights=batch.target_weights, supervised=batch.supervised)
    exact = (batch.target_weights.double() * ce.double()).sum()
    err = abs(loss_sum.double() - exact).item() / exact.item()
    assert err < 1e-6, f"Σ w·CE is off by {err:.2e} (relative) from the float32 weights'"
    print(f"rank {rank}: bf16 compute, float32 weights", flush=True)


def sharded_state(data_dir):
    """What bench.py scale predicts a rank holds of the float32 state is what FSDP2 gives the rank with the
    largest shards: parameters, gradients and AdamW's two moments, byte for byte."""
    from tools import bench
    rank, world = dist.get_rank(), dist.get_world_size()
    meta, split = train.load_data(data_dir)
    cfg = train.TrainConfig(data=data_dir, model="tiny")
    model = train.build_model(cfg, meta, init_device_mesh("cpu", (world,)), CPU, torch.float32)
    optimizer = train.make_optimizer(model, cfg, 1e-3)
    batch = train.make_batch(split, [rank], CPU)
    train.optimizer_step(model, optimizer, [batch], batch.target_weights.sum().item() * world, len(meta["sources"]), 1.0)
    held = lambda tensors: sum(t.to_local().numel() * t.element_size() for t in tensors)  # noqa: E731
    params = list(model.parameters())
    train.forward_backward(model, [batch], 1.0, len(meta["sources"]))  # the step cleared the gradients
    grads = [p.grad for p in params]
    moments = [optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    predicted = bench.memory_per_gpu(model.config, world, tokens=1, checkpointing=False)
    # Rank 0 holds ceil(rows / world) rows of every parameter, the most of any rank: the prediction's figure.
    check = (lambda a, b: a == b) if rank == 0 else (lambda a, b: a <= b)  # noqa: E731
    assert check(held(params), predicted["parameters, fp32 sharded"]), (held(params), predicted)
    assert check(held(grads), predicted["gradients, fp32 sharded"])
    assert check(held(moments), predicted["AdamW moments, fp32 sharded"])
    print(f"rank {rank}: sharded state as predicted", flush=True)


def export_logits(data_dir, out):
    cfg = train.TrainConfig(data=data_dir, model="tiny", out=out, batch_max_len=512, max_steps=3, lr=1e-3,
                            export_dtype="float32")
    model, export = train.train(cfg)
    tokens = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(tokens)
        loaded = load_pretrained(export)(tokens)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)

    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, trained, rtol=0, atol=1e-4)
    # transformers' tokenizer and chat template give the very ids of data.py's template at inference.
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.convert_tokens_to_ids("<|end_of_turn|>") == model.config.vocab_size - 1
    turns = [("user", "Sort: 3, 12, 1"), ("assistant", "1, 3, 12"), ("user", "Now 9, 40")]
    chat = [{"role": role, "content": text} for role, text in turns]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<s>GPT4 User: Sort: 3, 12, 1<|end_of_turn|>GPT4 Assistant: 1, 3, 12<|end_of_turn|>GPT4 User: Now 9, 40"
        "<|end_of_turn|>GPT4 Assistant:")
    ours = data.Tokenizer(Path(export) / "tokenizer.model", "openchat_v3.2")
    expected, _ = data.tokenize_conversation(ours, [Message(r, t) for r, t in turns], "GPT4", inference=True)
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == expected
    print("export matches", flush=True)


def recorded(file, *argv):
    """train.main(argv), every micro-batch's conversations appended to `file` as a JSON line with its rank."""
    import json
    make_batch = train.make_batch

    def recording(split, conversations, device):
        with open(file, "a") as f:
            f.write(json.dumps({"rank": dist.get_rank(), "conversations": conversations}) + "\n")
        return make_batch(split, conversations, device)

    train.make_batch = recording
    train.main(list(argv))


if __name__ == "__main__":
    if sys.argv[1] == "record":
        recorded(*sys.argv[2:])
        sys.exit()
    start_job()
    mode, *args = sys.argv[1:]
    {"step": step_identity, "losses": plain_and_fused, "hsdp": hsdp_gradient, "base": base_loading, "untrained": untrained_rows, "tied": tied_base, "bf16": bf16_weights,
     "state": sharded_state, "export": export_logits}[mode](*args)
    end_job()
