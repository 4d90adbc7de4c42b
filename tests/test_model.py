"""model.py against independent computations: a float64 naive loss, conversations run one by one, full
forward passes, the saved files themselves, and transformers' Llama and Mistral as an oracle."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
from conftest import MISTRAL_TOKENIZER, ROOT
from infra.hf import load_pretrained, save_pretrained
from model import ModelConfig, Transformer, fused_weighted_cross_entropy, repeat_kv, weighted_cross_entropy


def randomize(model, seed=0, std=0.2):
    """Weights large enough that a wrong detail (norm, rope, mask) shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.copy_(noise * std if p.dim() > 1 else 1 + 0.1 * noise)  # matrices, then RMSNorm gains
    return model


def tiny(dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    name = "tiny-mistral" if overrides.get("sliding_window") else "tiny"
    return randomize(Transformer(ModelConfig.from_name(name, **overrides)), seed).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The fused weighted loss


def naive_weighted_ce(hidden, weight, targets, weights):
    """Σ w·CE, per-token CE and [argmax = target] from the full logits, in float64, by autograd."""
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits, targets, reduction="none")
    return weighted_cross_entropy(logits, targets, weights)[0], ce, (logits.argmax(1) == targets).double()


def loss_case(name, dtype, H=16, V=103, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = {"mixed": 37, "single": 1, "all_zero": 20}[name]
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g) + 0.05
    if name == "mixed":  # C-RLFT's weights: expert 1.0, sub-optimal 0.1, others, and a third unsupervised
        weights[::4], weights[1::4] = 1.0, 0.1
        weights[torch.rand(N, generator=g) < 0.33] = 0
    if name == "all_zero":
        weights.zero_()
    return hidden.to(dtype), weight.to(dtype), targets, weights


TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["mixed", "single", "all_zero"])
def test_fused_loss_and_gradients_equal_a_float64_naive_computation(case, dtype):
    hidden, weight, targets, weights = loss_case(case, dtype)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # 8 tokens a chunk: the ~25 supervised tokens of "mixed" leave a partial last chunk.
    loss, ce, correct = fused_weighted_cross_entropy(h, W, targets, weights, chunk_tokens=8)
    (0.37 * loss).backward()  # the incoming gradient must scale both gradients

    h64, W64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_loss, ref_ce, ref_correct = naive_weighted_ce(h64, W64, targets, weights.double())
    (0.37 * ref_loss).backward()

    assert loss.dtype == ce.dtype == correct.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert h.grad.dtype == dtype and W.grad.dtype == dtype
    tol = TOLERANCE[dtype]
    kept = weights != 0
    assert not ce[~kept].any() and not correct[~kept].any()  # nothing computed for unsupervised tokens
    if case == "all_zero":
        assert loss.item() == 0
        assert not h.grad.any() and not W.grad.any()
        return
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert relative_error(ce[kept], ref_ce[kept].detach()) <= tol
    if dtype != torch.bfloat16:  # bf16 logits may flip a near-tie of the argmax
        assert torch.equal(correct[kept], ref_correct[kept].to(correct.dtype))
    assert relative_error(h.grad, h64.grad) <= tol
    assert relative_error(W.grad, W64.grad) <= tol


def test_fused_loss_never_reads_the_targets_of_unsupervised_tokens():
    hidden, weight, targets, weights = loss_case("mixed", torch.float32)
    garbage = targets.clone()
    garbage[weights == 0] = -1  # gather would fail on it
    for a, b in zip(fused_weighted_cross_entropy(hidden, weight, garbage, weights, chunk_tokens=8),
                    fused_weighted_cross_entropy(hidden, weight, targets, weights, chunk_tokens=8)):
        assert torch.equal(a, b)


def test_fused_loss_with_the_supervised_indices_given_gives_the_same_values():
    hidden, weight, targets, weights = loss_case("mixed", torch.float32)
    given = fused_weighted_cross_entropy(hidden, weight, targets, weights, weights.nonzero().squeeze(1), 8)
    for a, b in zip(given, fused_weighted_cross_entropy(hidden, weight, targets, weights, chunk_tokens=8)):
        assert torch.equal(a, b)


def test_fused_loss_without_gradients_gives_the_same_values():
    hidden, weight, targets, weights = loss_case("mixed", torch.float32)
    W = weight.clone().requires_grad_()
    with torch.no_grad():
        without = fused_weighted_cross_entropy(hidden, W, targets, weights, chunk_tokens=8)
    with_grad = fused_weighted_cross_entropy(hidden, W, targets, weights, chunk_tokens=8)
    for a, b in zip(without, with_grad):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_and_every_parameter_gradient_equal_the_naive_loss_on_its_logits(tie):
    model = tiny(torch.float64, tie_embeddings=tie)
    lengths = [7, 12, 5]
    tokens, positions, cu = packed_batch(model.config.vocab_size, lengths)
    targets = torch.roll(tokens, -1)
    weights = torch.rand(len(tokens), dtype=torch.float64)
    weights[torch.rand(len(tokens)) < 0.3] = 0
    weights[cu[1:] - 1] = 0  # the last token of a conversation predicts nothing

    loss = model(tokens, positions, cu, targets=targets, target_weights=weights)[0]
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens, positions, cu)
    ref = weighted_cross_entropy(logits, targets, weights)[0]
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for name, p in model.named_parameters():
        assert relative_error(fused[name], p.grad) < 1e-10, name


# ---------------------------------------------------------------------------------------------------------
# Packed streams, padded batches and the KV cache


def packed_batch(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return tokens, positions, cu_seqlens


CONFIGS = {"gqa": {}, "mha": dict(n_kv_heads=4), "window": dict(sliding_window=4)}


def test_padding_rows_of_the_vocabulary_change_nothing_but_the_memory(tmp_path):
    """vocab_multiple=64: 103 tokens in 128 rows. Initialised from the same seed the real rows are the
    unpadded model's; whatever the padding rows hold, the logits, the fused loss and the gradients are the
    unpadded model's, the padding rows get no gradient, and save_pretrained writes 103 rows."""
    torch.manual_seed(0)
    padded = Transformer(ModelConfig.from_name("tiny", vocab_size=103, vocab_multiple=64))
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_name("tiny", vocab_size=103))
    assert padded.lm_head.weight.shape == (128, 64) and torch.equal(padded.lm_head.weight[:103], plain.lm_head.weight)
    with torch.no_grad():
        padded.lm_head.weight[103:] = 5 * torch.randn(25, 64)  # large logits, were they not masked
    tokens, positions, cu = packed_batch(103, [9, 14])
    targets, weights = torch.roll(tokens, -1), torch.rand(len(tokens))
    with torch.no_grad():
        assert torch.allclose(padded(tokens, positions, cu), plain(tokens, positions, cu), atol=1e-6)
    losses = [m(tokens, positions, cu, targets=targets, target_weights=weights)[0] for m in (padded, plain)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-5 * losses[1].item()
    assert torch.allclose(padded.lm_head.weight.grad[:103], plain.lm_head.weight.grad, atol=1e-6)
    assert not padded.lm_head.weight.grad[103:].any()
    save_pretrained(padded, tmp_path)
    assert load_file(tmp_path / "model.safetensors")["lm_head.weight"].shape == (103, 64)
    with torch.no_grad():
        assert torch.allclose(load_pretrained(tmp_path)(tokens[None]), plain(tokens[None]), atol=1e-6)


def test_repeated_kv_heads_give_grouped_query_attention_as_a_float64_computation():
    """Query head h attends with K/V head h // (n_heads / n_kv_heads): SDPA over repeat_kv's heads (what CUDA
    runs under a mask) and SDPA's own enable_gqa (what the CPU runs) both equal a naive float64 attention."""
    g = torch.Generator().manual_seed(0)
    B, T, S, nh, nkv, hd = 2, 5, 9, 6, 2, 8
    q, k, v = torch.randn(B, nh, T, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g), torch.randn(
        B, nkv, S, hd, generator=g)
    mask = torch.rand(B, 1, T, S, generator=g) < 0.7
    mask[..., 0] = True  # every query sees a key
    group = torch.arange(nh) // (nh // nkv)
    scores = q.double() @ k.double()[:, group].transpose(-1, -2) / hd ** 0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()[:, group]
    repeated = F.scaled_dot_product_attention(q, *repeat_kv(k, v, nh, dim=1), attn_mask=mask)
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert relative_error(repeated, expected) < 1e-6 and relative_error(grouped, expected) < 1e-6


@pytest.mark.parametrize("config", CONFIGS)
def test_packed_stream_equals_the_conversations_run_one_by_one(config):
    model = tiny(**CONFIGS[config])
    lengths = [5, 11, 1, 7]
    tokens, positions, cu = packed_batch(model.config.vocab_size, lengths)
    with torch.no_grad():
        packed = model(tokens, positions, cu)
        for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            alone = model(tokens[a:b][None])[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=0, atol=1e-5, msg=f"conversation {s}")


def test_packed_attention_never_crosses_a_conversation():
    model = tiny()
    tokens, positions, cu = packed_batch(model.config.vocab_size, [6, 9])
    changed = tokens.clone()
    changed[:6] = (changed[:6] + 1) % model.config.vocab_size  # rewrite the whole first conversation
    with torch.no_grad():
        before, after = model(tokens, positions, cu), model(changed, positions, cu)
    assert not torch.allclose(before[:6], after[:6])
    torch.testing.assert_close(before[6:], after[6:], rtol=0, atol=1e-6)


def test_sliding_window_sees_the_token_itself_and_window_minus_one_before_it():
    model = tiny(sliding_window=4, n_layers=1)  # one layer: no path around the window through other tokens
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    t = 10
    with torch.no_grad():
        base = model(tokens)[0, t]
        for back, seen in ((3, True), (4, False)):
            changed = tokens.clone()
            changed[0, t - back] = (changed[0, t - back] + 1) % model.config.vocab_size
            assert torch.allclose(model(changed)[0, t], base) != seen, f"token {back} back"


def test_padded_batch_agrees_with_the_packed_stream():
    model = tiny(sliding_window=4)
    lengths = [9, 4, 6]
    tokens, positions, cu = packed_batch(model.config.vocab_size, lengths)
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # right padding
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        padded[i, : b - a] = tokens[a:b]
    with torch.no_grad():
        packed, batch = model(tokens, positions, cu), model(padded)
    assert batch.shape == (3, 9, model.config.vocab_size)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        torch.testing.assert_close(batch[i, : b - a], packed[a:b], rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_kv_cache_decoding_equals_the_full_forward_step_by_step(config):
    model = tiny(**CONFIGS[config])
    prompt_lengths, steps = [3, 6], 9
    sequences = torch.randint(0, model.config.vocab_size, (2, max(prompt_lengths) + steps))
    with torch.no_grad():
        full = model(sequences)  # [2, T, V] without a cache
        model.setup_kv_cache(batch_size=2, max_seq_len=32)
        # Prefill both prompts right-padded to the longer one; row 0's padding slots are overwritten later.
        prefill = model(sequences[:, : max(prompt_lengths)])
        for row, n in enumerate(prompt_lengths):
            torch.testing.assert_close(prefill[row, :n], full[row, :n], rtol=0, atol=1e-5)
        lengths = torch.tensor(prompt_lengths)
        for _ in range(steps):  # one token per row at its own position
            step = model(sequences[[0, 1], lengths][:, None], positions=lengths[:, None])
            for row in range(2):
                torch.testing.assert_close(step[row, 0], full[row, lengths[row]], rtol=0, atol=1e-5)
            lengths += 1


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def assert_same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("max_shard_bytes", [5_000_000_000, 40_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_then_from_pretrained_is_exact(tmp_path, tie, max_shard_bytes, dtype):
    model = tiny(dtype, tie_embeddings=tie, sliding_window=8)
    save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    loaded = load_pretrained(tmp_path, dtype=dtype)
    assert loaded.config == model.config
    assert_same_parameters(model, loaded)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie

    files = sorted(p.name for p in tmp_path.iterdir())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["tie_word_embeddings"] == tie
    if max_shard_bytes > 1e6:
        assert files == ["config.json", "model.safetensors"]
        return
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and files == sorted(shards + ["config.json", "model.safetensors.index.json"])
    stored = {}
    for shard in shards:
        tensors = load_file(tmp_path / shard)
        assert all(index["weight_map"][n] == shard for n in tensors)
        # a shard only exceeds the limit when it holds a single tensor larger than the limit
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000
        stored.update(tensors)
    assert stored.keys() == index["weight_map"].keys()
    assert ("lm_head.weight" in stored) != tie  # a tied head is not stored, as transformers does
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())


def test_a_new_save_removes_the_shards_of_an_earlier_one(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_parameters(model, load_pretrained(tmp_path))


def test_from_pretrained_names_the_problem(tmp_path):
    model = tiny()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_pretrained(tmp_path)

    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj"
                                         r"\.weight has shape \(\d+, \d+\), config.json implies"):
        load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(tmp_path / shard)
    save_file({n: t for n, t in tensors.items() if n != "model.norm.weight"}, tmp_path / shard)
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e\.g\. \['norm\.weight'\]"):
        load_pretrained(tmp_path)

    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"lists {shard}, which is missing"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("tie", [False, True])
def test_a_base_loaded_for_a_template_with_new_tokens_starts_their_rows_at_the_mean(tmp_path, tie):
    """A base of the Mistral tokenizer's 32,000 pieces, loaded whole for the 3.5 template: <|end_of_turn|> and
    <|pad_0|> get rows 32,000 and 32,001, in the embedding and the output head, at the mean of the base's rows."""
    base = tiny(vocab_size=32000, tie_embeddings=tie)
    save_pretrained(base, tmp_path)
    tokenizer = data.Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")
    model = load_pretrained(tmp_path, tokenizer=tokenizer, from_base=True)
    assert model.config.vocab_size == tokenizer.vocab_size == 32002
    for name in ("embed_tokens.weight", "lm_head.weight"):
        w, ref = model.get_parameter(name), base.get_parameter(name).detach()
        assert torch.equal(w[:32000], ref)
        torch.testing.assert_close(w[32000:], ref.double().mean(0).float().expand(2, -1), rtol=0, atol=1e-7)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert model(torch.tensor([[1, 32000, 32001]])).shape == (1, 3, 32002)


# ---------------------------------------------------------------------------------------------------------
# transformers as the oracle: both load one Hugging Face folder with the same random weights

HF_CASES = {
    "llama-multi-head": dict(num_key_value_heads=4),
    "llama-grouped-query": dict(num_key_value_heads=2),
    "llama-tied-embeddings": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope-scaling": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "mistral-sliding-window": dict(num_key_value_heads=2, sliding_window=5, rope_theta=20000.0),
    # Qwen2: biases on q, k, v (not in its config.json: the architecture has them), rope θ 1e6, no window.
    "qwen2": dict(num_key_value_heads=2, rope_theta=1e6, use_sliding_window=False),
    "qwen2-tied-embeddings": dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_transformers_in_both_directions(tmp_path, case):
    import transformers

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, **HF_CASES[case])
    if case.startswith("qwen2"):
        hf_config, hf_class = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    elif "sliding_window" in kwargs:
        hf_config, hf_class = transformers.MistralConfig(**kwargs), transformers.MistralForCausalLM
    else:
        hf_config, hf_class = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    hf_config._attn_implementation = "eager"
    # float64 leaves only the float32 steps both models take (norms, rotary tables): 1e-5 where float32 gives 1e-4.
    dtype, atol = (torch.float64, 1e-5) if case.startswith("qwen2") else (torch.float32, 1e-4)
    torch.manual_seed(0)
    hf = randomize(hf_class(hf_config)).to(dtype).eval()
    assert not case.startswith("qwen2") or hf.model.layers[0].self_attn.q_proj.bias is not None
    tokens = torch.randint(0, 300, (2, 24))  # longer than the window and than original_max_position_embeddings
    with torch.no_grad():
        expected = hf(tokens).logits

    hf.save_pretrained(tmp_path / "from_hf", max_shard_size=60_000)  # sharded, with an index
    assert (tmp_path / "from_hf" / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path / "from_hf", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), expected, rtol=0, atol=atol)

    save_pretrained(ours, tmp_path / "from_us")
    reloaded = hf_class.from_pretrained(tmp_path / "from_us", dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# FSDP2: the output weight as a sharded parameter, in real processes


def test_fused_loss_reads_the_fsdp2_sharded_output_weight_in_two_processes():
    worker = ROOT / "tests" / "fsdp_loss_worker.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("fsdp2 gradients match") == 2 * 3  # both ranks, three cases


# ---------------------------------------------------------------------------------------------------------
# GPU paths: flash varlen attention and bf16 matmuls (skipped without CUDA)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("config", CONFIGS)
def test_flash_varlen_stream_equals_conversations_one_by_one_on_cuda(config):
    model = tiny(torch.bfloat16, **CONFIGS[config]).cuda()
    lengths = [50, 130, 1, 77]
    tokens, positions, cu = (t.cuda() for t in packed_batch(model.config.vocab_size, lengths))
    with torch.no_grad():
        packed = model(tokens, positions, cu).float()  # flash varlen
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model(tokens[a:b][None])[0].float()  # SDPA with a mask
            assert relative_error(packed[a:b], alone.double()) < 2e-2


@cuda
def test_the_sliding_window_through_flash_varlen_has_the_gradients_of_sdpa_on_cuda():
    """Mistral's window in training: a packed stream through flash varlen, forward and backward, against its
    conversations one by one through SDPA with the windowed mask."""
    model = tiny(torch.bfloat16, sliding_window=4).cuda()
    lengths = [50, 13, 77]
    tokens, positions, cu = (t.cuda() for t in packed_batch(model.config.vocab_size, lengths))
    targets = torch.roll(tokens, -1)
    F.cross_entropy(model(tokens, positions, cu).float(), targets, reduction="sum").backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        F.cross_entropy(model(tokens[a:b][None])[0].float(), targets[a:b], reduction="sum").backward()
    for name, p in model.named_parameters():
        assert relative_error(packed[name], p.grad.double()) < 3e-2, name


@cuda
def test_masked_gqa_attention_runs_a_fused_kernel_on_cuda():
    """With the math backend ruled out, a GQA model's padded batch and decoding (SDPA with a mask) still run,
    and give the logits of the unrestricted run: the K/V heads are repeated for the memory-efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny(torch.bfloat16).cuda()  # 4 query heads over 2 K/V heads
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        reference = model(tokens).float()
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            fused = model(tokens).float()
            model.setup_kv_cache(2, 64)
            model(tokens[:, :39], torch.arange(39, device="cuda").expand(2, -1))
            step = model(tokens[:, 39:], torch.full((2, 1), 39, device="cuda"))[:, 0].float()
            model.drop_kv_cache()
    assert relative_error(fused, reference.double()) < 2e-2
    assert relative_error(step, reference[:, 39].double()) < 2e-2


@cuda
def test_fused_loss_in_bf16_on_cuda_equals_a_float64_naive_computation():
    """Chunks of 8 tokens: the weight gradient goes through many float32-output matmuls (addmm, out_dtype)."""
    hidden, weight, targets, weights = (t.cuda() for t in loss_case("mixed", torch.bfloat16, H=256, V=5000))
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_weighted_cross_entropy(h, W, targets, weights, chunk_tokens=8)[0]
    loss.backward()
    h64, W64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = naive_weighted_ce(h64, W64, targets, weights.double())[0]
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    assert relative_error(h.grad, h64.grad) < 2e-2 and relative_error(W.grad, W64.grad) < 2e-2
