"""train.py in real processes (python and torchrun, gloo on CPU): the normalisation of METHOD.md §4 against a
float64 computation, one process against two, interruption and resumption, exports, and the faults."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from data import load_split
from infra.hf import save_pretrained
from model import ModelConfig, Transformer


def run(args, world=1, check=True, preexec_fn=None, script="train.py"):
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    result = subprocess.run(launcher + [str(ROOT / script)] + [str(a) for a in args], cwd=ROOT, text=True,
                            capture_output=True, timeout=600, preexec_fn=preexec_fn)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def small_run(dataset, out, *extra):
    return ["--data", dataset, "--base=", "--out", out, "--model=tiny", "--batch-max-len=512", "--lr=1e-3", "--log-every=1",
            "--export-dtype=float32", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def exported(out):
    [export] = sorted((out / "exports").iterdir(), key=lambda p: p.stat().st_mtime)[-1:]
    return load_file(export / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------
# The normalisation (METHOD.md §4)


def test_two_micro_batches_of_k_tokens_equal_one_batch_of_2k(dataset):
    meta, split = train.load_data(dataset)
    first, second = [0, 1, 2, 3], [4, 5, 6]
    weight_sum = train.step_weight_sum(train.conversation_weights(split), [first, second])
    grads = []
    for batches in ([first, second], [first + second]):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny", vocab_size=meta["tokenizer"]["vocab_size"]))
        train.forward_backward(model, [train.make_batch(split, b, torch.device("cpu")) for b in batches],
                               weight_sum, n_classes=2)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_step_gradient_is_exactly_that_of_the_global_weighted_mean_across_ranks(dataset):
    """Two ranks × two micro-batches with very different weight sums per rank, against ∇L in float64."""
    result = run(["step", dataset], world=2, script="tests/train_worker.py")
    assert result.stdout.count("normalisation identity holds") == 2


@pytest.mark.parametrize("world", [1, 2])
def test_the_plain_and_the_fused_loss_give_a_step_the_same_loss_and_gradient(dataset, world):
    """--loss=plain (the formula over the full logits) and --loss=fused, in float64: one step's Σ w·CE of each
    micro-batch, its per-class sums and its gradient, summed over the ranks, agree (to 1e-7: the model's RMSNorm
    runs in float32)."""
    result = run(["losses", dataset], world=world, script="tests/train_worker.py")
    assert result.stdout.count("plain and fused loss agree") == world


def test_train_py_trains_with_the_plain_loss_as_with_the_fused_one(dataset, tmp_path):
    run(small_run(dataset, tmp_path / "fused", "--max-steps=3"))
    run(small_run(dataset, tmp_path / "plain", "--max-steps=3", "--loss=plain"))
    for fused, plain in zip(metrics(tmp_path / "fused"), metrics(tmp_path / "plain"), strict=True):
        assert plain["loss"] == pytest.approx(fused["loss"], rel=1e-5)
        assert plain["accuracy"] == pytest.approx(fused["accuracy"], rel=1e-5)


@pytest.mark.slow
def test_one_process_and_two_processes_train_alike(dataset, tmp_path):
    """1 rank × 2 micro-batches and 2 ranks × 1 micro-batch see the same streams in every step."""
    run(small_run(dataset, tmp_path / "one", "--grad-accum=2", "--max-steps=5"))
    run(small_run(dataset, tmp_path / "two", "--grad-accum=1", "--max-steps=5"), world=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert [c["class"] for c in a["loss_per_class"]] == [0, 1]
        for c, d in zip(a["loss_per_class"], b["loss_per_class"]):
            assert c == {**d, "loss": pytest.approx(d["loss"], rel=1e-5)}
    weights_one, weights_two = exported(tmp_path / "one"), exported(tmp_path / "two")
    for name in weights_one:
        torch.testing.assert_close(weights_one[name], weights_two[name], rtol=0, atol=2e-6, msg=name)


def test_the_recipe_presets_and_the_learning_rate_schedule():
    cfg = train.load_config(["--preset=openchat-13b", "--epochs=2", "--data=d"])
    assert (cfg.model, cfg.batch_max_len, cfg.epochs, cfg.activation_checkpointing) == ("Llama-2-13B", 32768, 2, True)
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 1e-5, 0.1, 1.0)
    assert cfg.lr == 0 and train.load_config(["--preset=mistral-7b"]).lr_scale == pytest.approx(1 / 6)
    # The bare command is the demo's C-RLFT run; a flag given always wins, whatever the others are.
    demo = train.load_config([])
    assert (demo.data, demo.base) == ("data/demo/dataset", "runs/demo-base/exports/epoch-1")
    assert train.load_config(["--data=d"]).base == demo.base
    assert train.load_config(["--data=d", "--base="]).base == "" and cfg.base == ""
    assert train.auto_lr(200_000) == pytest.approx(6.7e-5, rel=0.01)  # the paper's step
    # The reference README's tokens per GPU for its Mistral and Llama-3 recipes.
    assert [train.load_config([f"--preset={p}"]).batch_max_len for p in ("mistral-7b", "llama-3-8b")] == [
        77824, 40960]
    lrs = [train.learning_rate(s, 200, 1.0, cfg) for s in range(200)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # 5% warm-up: 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_the_automatic_learning_rate_reads_s_as_the_reference_does(dataset, tmp_path):
    """S = a step's capacity (ranks × micro-batches × batch_max_len) × the share of the data's tokens that are
    supervised (the reference's calculate_auto_lr), not the tokens the plan happens to pack."""
    weights = np.load(dataset / "train" / "target_weights.npy")
    share = np.count_nonzero(weights) / len(weights)
    result = run(small_run(dataset, tmp_path, "--max-steps=1", "--lr=0", "--grad-accum=2", "--lr-scale=0.5"))
    expected = 3e-4 * (2 * 512 * share / 4e6) ** 0.5 * 0.5
    assert f"peak lr {expected:.3g};" in result.stdout


@pytest.mark.slow
def test_activation_checkpointing_changes_nothing_but_memory(dataset, tmp_path):
    run(small_run(dataset, tmp_path / "plain", "--max-steps=3"))
    run(small_run(dataset, tmp_path / "checkpointed", "--max-steps=3", "--activation-checkpointing"))
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "checkpointed")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and exports


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identical_to_an_uninterrupted_one(dataset, tmp_path):
    # Threads pinned: a process takes the cores idle at its start, and 1 thread sums in another order than 2.
    args = ["--epochs=2", "--save-every=2", "--threads=2"]
    run(small_run(dataset, tmp_path / "straight", *args))

    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, small_run(dataset, out, *args))],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list((out / "checkpoints").glob("step-*")) and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    total = metrics(tmp_path / "straight")[-1]["step"]
    assert killed_at < total, "the run should have been killed before its end"
    partial = out / "checkpoints" / f".tmp-step-{killed_at + 2:08d}"  # as if killed while saving the next one
    partial.mkdir(exist_ok=True)
    (partial / "__0_0.distcp").write_bytes(b"half written")

    resumed = run(small_run(dataset, out, *args, "--resume"))
    assert f"resumed from {out / 'checkpoints'}/step-" in resumed.stdout
    straight, interrupted = exported(tmp_path / "straight"), exported(out)
    assert all(torch.equal(straight[n], interrupted[n]) for n in straight)  # bit-identical
    after = {r["step"]: r["loss"] for r in metrics(out)}
    assert all(after[r["step"]] == r["loss"] for r in metrics(tmp_path / "straight") if r["step"] > killed_at)


def stop_with(sig, dataset, out, world, *args):
    """train.py started (under torchrun for world > 1), sent `sig` once it has logged step 3; its
    result."""
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    process = subprocess.Popen(launcher + [str(ROOT / "train.py"), *map(str, small_run(dataset, out, *args))],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        time.sleep(0.02)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, world", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_a_stop_signal_ends_the_step_checkpoints_and_the_run_resumes_bit_identical(dataset, tmp_path, sig,
                                                                                   world):
    """SIGTERM (a scheduler's warning) or SIGINT (Ctrl-C): every rank finishes the same step, one
    checkpoint is written, one line says where and how to continue, the exit status is 128 + the
    signal's number (torchrun, sent SIGTERM itself, forwards it and reports its own failure); --resume
    then ends with the weights of a run never stopped."""
    args = ["--epochs=2"]  # no --save-every: without the signal, only the epochs' ends are saved
    args += ["--threads=2"] if world == 1 else []  # torchrun gives each rank 1; alone, the idle cores
    run(small_run(dataset, tmp_path / "straight", *args), world=world)
    out = tmp_path / "stopped"
    status, stdout, stderr = stop_with(sig, dataset, out, world, *args)
    [line] = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    step = int(line.split("after step ")[1].split()[0])
    assert line.startswith(f"stopped by {signal.Signals(sig).name} after step {step} of ")
    assert f"checkpoints/step-{step:08d}; the same command with --resume continues the run" in line
    assert status == (128 + sig if world == 1 else 1) and "[rank0]:" not in stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]  # before epoch 1's end
    assert metrics(out)[-1]["step"] == step  # the step's row logged
    run(small_run(dataset, out, *args, "--resume"), world=world)
    straight, resumed = exported(tmp_path / "straight"), exported(out)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)  # bit-identical


@pytest.mark.slow
def test_a_run_directory_holds_one_run(dataset, tmp_path):
    """A second run into it is refused before training; --resume refuses other data; resuming a finished run
    says so; rows logged after the resumed checkpoint are not kept twice."""
    run(small_run(dataset, tmp_path / "run", "--max-steps=5", "--save-every=2"))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = run(small_run(dataset, tmp_path / "run", "--max-steps=5"), check=False)
    assert again.returncode != 0 and "already holds a run: --resume continues it" in again.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before and "step 1/" not in again.stdout

    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    (other / "meta.json").write_text((other / "meta.json").read_text().replace('"max_len"', '"max_len" '))
    refused = run(small_run(other, tmp_path / "run", "--max-steps=6", "--resume"), check=False)
    assert refused.returncode != 0 and "is not that dataset's: resume with the run's own data" in refused.stderr

    done = run(small_run(dataset, tmp_path / "run", "--max-steps=5", "--resume"))
    assert "is complete (5 of 5 steps): nothing to do" in done.stdout

    finished = exported(tmp_path / "run")  # as if killed while exporting: the export not swapped in
    os.rename(tmp_path / "run" / "exports" / "step-5", tmp_path / "run" / "exports" / ".tmp-step-5")
    redone = run(small_run(dataset, tmp_path / "run", "--max-steps=5", "--resume"))
    assert "exports/step-5 was not finished: exporting it again" in redone.stdout
    assert not (tmp_path / "run" / "exports" / ".tmp-step-5").exists()
    assert all(torch.equal(finished[n], t) for n, t in exported(tmp_path / "run").items())

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000005")  # as if killed after logging step 5
    run(small_run(dataset, tmp_path / "run", "--max-steps=6", "--resume"))
    assert [row["step"] for row in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumed(dataset, tmp_path):
    run(small_run(dataset, tmp_path / "whole", "--max-steps=6", "--save-every=2"))
    run(small_run(dataset, tmp_path / "run", "--max-steps=4", "--save-every=2"))
    [shard] = (tmp_path / "run" / "checkpoints" / "step-00000004").glob("*.distcp")
    os.truncate(shard, 100)  # as a disk that filled while the file was written would leave it
    resumed = run(small_run(dataset, tmp_path / "run", "--max-steps=6", "--save-every=2", "--resume"))
    assert "step-00000004 does not load" in resumed.stdout and "resumed from" in resumed.stdout
    assert (tmp_path / "run" / "checkpoints" / "damaged-step-00000004").exists()
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path / "run")] == [
        (r["step"], r["loss"]) for r in metrics(tmp_path / "whole")]  # steps 3-4 again, exactly as before
    whole, resumed_export = exported(tmp_path / "whole"), exported(tmp_path / "run")
    assert all(torch.equal(whole[n], resumed_export[n]) for n in whole)


@pytest.mark.slow
def test_a_users_mistake_is_one_error_line_without_a_traceback(tmp_path):
    """Plain python: the error line alone. torchrun: the error line once (rank 0's) and no rank's traceback;
    torchrun itself then reports the failed ranks (its own traceback, from the launcher)."""
    for world in (1, 2):
        result = run(small_run(tmp_path / "missing", tmp_path / f"run-{world}"), world=world, check=False)
        assert result.returncode != 0 and result.stderr.count(f"error: {tmp_path / 'missing'}") == 1
        assert "[rank0]:" not in result.stderr and "[rank1]:" not in result.stderr
        assert world == 2 or "Traceback" not in result.stderr


@pytest.mark.slow
def test_keep_last_keeps_only_the_newest_checkpoints(dataset, tmp_path):
    run(small_run(dataset, tmp_path, "--max-steps=6", "--save-every=1", "--keep-last=2"))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-00000005", "step-00000006"]


@pytest.mark.slow
def test_the_export_loads_back_with_the_trained_logits_in_ours_and_in_transformers(dataset, tmp_path):
    result = run(["export", dataset, tmp_path], script="tests/train_worker.py")
    assert "export matches" in result.stdout
    export = tmp_path / "exports" / "step-3"
    assert sorted(p.name for p in export.iterdir()) == ["Modelfile", "README.md", "config.json", "crlft.json",
                                                       "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    crlft = json.loads((export / "crlft.json").read_text())
    assert crlft["inference_condition"] == "GPT4" and crlft["conditions"] == ["GPT3", "GPT4"]
    eot = json.loads((dataset / "meta.json").read_text())["tokenizer"]["special_tokens"]["<|end_of_turn|>"]
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == eot


@pytest.mark.parametrize("vocab_multiple", [1, pytest.param(64, marks=pytest.mark.slow)])
def test_a_base_model_is_read_a_slice_per_rank_and_new_token_rows_start_at_the_mean(dataset, tmp_path,
                                                                                    vocab_multiple):
    torch.manual_seed(0)
    base_vocab = json.loads((dataset / "meta.json").read_text())["tokenizer"]["base_vocab_size"]
    save_pretrained(Transformer(ModelConfig.from_name("tiny", vocab_size=base_vocab)), tmp_path, max_shard_bytes=100_000)
    result = run(["base", dataset, tmp_path, vocab_multiple], world=2, script="tests/train_worker.py")
    assert result.stdout.count("base loaded") == 2


def test_token_weights_reach_the_loss_exact_under_a_bf16_policy(dataset):
    """FSDP2 casts a root module's floating inputs to the compute dtype unless told not to: the weights must
    stay float32 (two ranks, bf16 compute on CPU)."""
    result = run(["bf16", dataset], world=2, script="tests/train_worker.py")
    assert result.stdout.count("bf16 compute, float32 weights") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_blocks_train_as_eager_ones_on_cuda(dataset, tmp_path):
    """--compile (inductor, each block) with bf16 compute and NCCL: the same losses as eager, within bf16."""
    run(small_run(dataset, tmp_path / "eager", "--max-steps=3"))
    run(small_run(dataset, tmp_path / "compiled", "--max-steps=3", "--compile"))
    for eager, compiled in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")):
        assert abs(compiled["loss"] - eager["loss"]) <= 2e-2 * eager["loss"]


@pytest.mark.slow
def test_vocabulary_padding_rows_train_as_none_and_leave_the_exports(dataset, tmp_path):
    """--vocab-multiple=64 (a GPU's default) on the CPU: the same losses as without, an export of the real size."""
    run(small_run(dataset, tmp_path / "plain", "--max-steps=3"))
    run(small_run(dataset, tmp_path / "padded", "--max-steps=3", "--vocab-multiple=64"))
    for plain, padded in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "padded")):
        assert abs(padded["loss"] - plain["loss"]) <= 1e-5 * plain["loss"]
    vocab = json.loads((dataset / "meta.json").read_text())["tokenizer"]["vocab_size"]
    assert vocab % 64 and exported(tmp_path / "padded")["model.embed_tokens.weight"].shape[0] == vocab


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_bench_scale_predicts_the_sharded_state_each_rank_holds(dataset, world):
    result = run(["state", dataset], world=world, script="tests/train_worker.py")
    assert result.stdout.count("sharded state as predicted") == world


@pytest.mark.slow
def test_the_demo_config_overfits_a_small_batch(dataset):
    """The demo model and optimizer settings drive the loss of one batch of 8 conversations to ~0."""
    meta, split = train.load_data(dataset)
    cfg = train.TrainConfig()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(cfg.model, vocab_size=meta["tokenizer"]["vocab_size"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    batch = train.make_batch(split, list(range(8)), torch.device("cpu"))
    weight_sum = batch.target_weights.sum().item()
    for _ in range(120):
        stats, _ = train.forward_backward(model, [batch], weight_sum, n_classes=2)
        optimizer.step()
        optimizer.zero_grad()
    ce, correct, weight = stats.sum(0).tolist()
    assert ce / weight < 0.05 and correct == weight  # every supervised token right


# ---------------------------------------------------------------------------------------------------------
# Bad input and faults


@pytest.mark.slow
def test_the_bare_command_without_the_demo_data_says_in_one_line_how_to_make_it(tmp_path):
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"]):
        result = subprocess.run(launcher + [str(ROOT / "train.py")], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0 and "[rank0]:" not in result.stderr  # no rank's traceback
        assert result.stderr.count("error: data/demo/dataset/meta.json is missing (`python demo.py` makes "
                                   "the demo's data and base)") == 1


@pytest.mark.slow
def test_a_missing_or_damaged_dataset_is_named(dataset, tmp_path):
    result = run(small_run(tmp_path / "nowhere", tmp_path / "out"), check=False)
    assert result.returncode != 0 and "nowhere/meta.json is missing" in result.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in dataset.iterdir():
        os.symlink(item, damaged / item.name)
    (damaged / "train").unlink()
    (damaged / "train").mkdir()
    for item in (dataset / "train").iterdir():
        os.symlink(item, damaged / "train" / item.name)
    (damaged / "train" / "tokens.npy").unlink()
    np.save(damaged / "train" / "tokens.npy", np.load(dataset / "train" / "tokens.npy")[:-5])
    result = run(small_run(damaged, tmp_path / "out"), check=False)
    assert result.returncode != 0 and "the arrays disagree" in result.stderr


@pytest.mark.slow
def test_a_base_that_does_not_match_the_tokenizer_is_refused(dataset, tmp_path):
    base_vocab = json.loads((dataset / "meta.json").read_text())["tokenizer"]["base_vocab_size"]
    save_pretrained(Transformer(ModelConfig.from_name("tiny", vocab_size=base_vocab + 7)), tmp_path / "base")
    result = run(small_run(dataset, tmp_path / "out", "--base", tmp_path / "base"), check=False)
    assert result.returncode != 0
    assert (f"has {base_vocab + 7} vocabulary rows but the dataset's tokenizer has {base_vocab} pieces (+1 special)"
            in result.stderr)


@pytest.mark.slow
def test_a_conversation_longer_than_batch_max_len_is_named(dataset, tmp_path):
    result = run(small_run(dataset, tmp_path, "--batch-max-len=40"), check=False)
    assert result.returncode != 0
    assert "tokens, more than batch_max_len=40; raise --batch-max-len" in result.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_batch(dataset, tmp_path):
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for item in dataset.iterdir():
        if item.name != "train":
            os.symlink(item, poisoned / item.name)
    (poisoned / "train").mkdir()
    for item in (dataset / "train").iterdir():
        if item.name != "target_weights.npy":
            os.symlink(item, poisoned / "train" / item.name)
    split = load_split(dataset)
    weights = np.array(split.target_weights)
    victim = 17
    weights[split.offsets[victim] + split.lengths[victim] - 2] = np.nan  # an answer token of one conversation
    np.save(poisoned / "train" / "target_weights.npy", weights)
    result = run(small_run(poisoned, tmp_path / "out", "--save-every=1"), check=False)
    assert result.returncode != 0 and "non-finite loss at step" in result.stderr
    named = result.stderr.split("micro-batch 1 (conversations [")[1].split("]")[0]
    assert victim in [int(i) for i in named.split(",")]
    steps_done = int(result.stderr.split("non-finite loss at step ")[1].split()[0]) - 1
    saved = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert len(saved) == steps_done  # every completed step saved, nothing after the bad one


@pytest.mark.slow
def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_intact(dataset, tmp_path):
    run(small_run(dataset, tmp_path, "--max-steps=4", "--save-every=2"))
    before = sorted((tmp_path / "checkpoints").glob("step-*"))

    def small_files():  # the kernel refuses to grow any file past 64 KiB, as a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = run(small_run(dataset, tmp_path, "--max-steps=6", "--save-every=2", "--resume"), check=False,
                 preexec_fn=small_files)
    assert result.returncode != 0
    assert "saving checkpoint" in result.stderr and "the previous checkpoints are intact" in result.stderr
    assert sorted((tmp_path / "checkpoints").glob("step-*")) == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    run(small_run(dataset, tmp_path, "--max-steps=6", "--save-every=2", "--resume"))  # and it resumes
    assert (tmp_path / "checkpoints" / "step-00000006").exists()
