"""train.py as it is used at scale, in real processes on this CPU (gloo, one thread per process): 8 ranks under
one torchrun, two torchrun launchers forming one job of two "nodes", HSDP, a run resumed on another number of
ranks, and the failures that only a job of several ranks meets."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT
from infra.hf import save_pretrained
from infra.run_plan import plan_fingerprint, plan_run
from model import ModelConfig, Transformer, weighted_cross_entropy
from test_train import exported, metrics, run, small_run

pytestmark = pytest.mark.slow  # the whole file: the full suite only

CPU = torch.device("cpu")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def float64_steps(dataset, args, streams: int, steps: int) -> list[float]:
    """METHOD.md §4 computed plainly in one process, in float64: the run's first steps from the bins of its
    plan (every stream of each step together), each loss Σ w·CE / Σ w, then AdamW as train.py sets it."""
    cfg = train.load_config([str(a) for a in args])
    meta, split = train.load_data(dataset)
    plan = plan_run(split, cfg, train.conversation_weights(split), streams)
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig.from_name(cfg.model, vocab_size=meta["tokenizer"]["vocab_size"])).double()
    optimizer = train.make_optimizer(model, cfg, cfg.lr)
    losses = []
    for step, bins in enumerate(plan.epochs[0][:steps]):
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(step, plan.total_steps, cfg.lr, cfg)
        numerator, denominator = 0, 0
        for b in bins:
            batch = train.make_batch(split, b, CPU)
            logits = model(batch.tokens, batch.positions, batch.cu_seqlens)
            numerator = numerator + weighted_cross_entropy(logits, batch.targets, batch.target_weights.double())[0]
            denominator += batch.target_weights.double().sum().item()
        loss = numerator / denominator
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------------------
# 8 ranks under one torchrun


def test_eight_ranks_hold_one_plan_train_as_one_float64_process_checkpoint_resume_and_export(dataset, tmp_path):
    out = tmp_path / "eight"
    args = small_run(dataset, out, "--max-steps=2", "--save-every=1")
    result = run(args, world=8)
    meta, split = train.load_data(dataset)
    plan = plan_run(split, train.load_config([str(a) for a in args]), train.conversation_weights(split), 8)
    # Every rank gathered the plan's fingerprint (its steps' conversations and their Σ w): all alike.
    assert f"plan {plan_fingerprint(plan)}, the same on all 8 ranks" in result.stdout
    assert "8 rank(s) on cpu (1 thread(s) each), FSDP" in result.stdout
    losses = [row["loss"] for row in metrics(out)]
    assert losses == pytest.approx(float64_steps(dataset, args, streams=8, steps=2), rel=1e-5)

    # Resumed from step 1 on 2 ranks × 4 micro-batches: the same 8 streams a step, the same step 2.
    eight = exported(out)
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    shutil.rmtree(out / "exports")  # step 2 ends the first epoch: exports/epoch-1
    resumed = run(small_run(dataset, out, "--max-steps=2", "--save-every=1", "--grad-accum=4", "--resume"), world=2)
    assert "resumed on 2 x 4: the same 8 streams a step, the plan goes on unchanged" in resumed.stdout
    assert [row["loss"] for row in metrics(out)] == pytest.approx(losses, rel=1e-6)
    for name, tensor in exported(out).items():
        torch.testing.assert_close(tensor, eight[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Two nodes: two torchrun launchers, one job


def launch_two_nodes(rendezvous: str, args, node_args=((), ())) -> list[subprocess.CompletedProcess]:
    """Two torchrun launchers of 2 processes each, as on two hosts (here both on localhost), started
    together; node i's train.py gets args + node_args[i]."""
    port = free_port()
    if rendezvous == "static":  # each node told its rank and the master's address
        flags = [[f"--node-rank={i}", "--master-addr=127.0.0.1", f"--master-port={port}"] for i in (0, 1)]
    else:  # c10d: every node the same endpoint and job id; node ranks assigned at the rendezvous
        flags = [["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=crlft"]] * 2
    nodes = [subprocess.Popen(TORCHRUN + ["--nnodes=2", "--nproc-per-node=2", *flags[i], str(ROOT / "train.py"),
                                          *map(str, args), *map(str, node_args[i])],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def test_two_nodes_form_one_job_that_trains_as_one_process_and_resumes_under_hsdp(dataset, tmp_path):
    """Static rendezvous for steps 1-2, then c10d to resume for steps 3-4 under HSDP (the model sharded inside
    each node, replicated across the two): 4 ranks, 4 streams a step, the losses of one process with
    --grad-accum=4; only rank 0 of the job logs and writes."""
    one = tmp_path / "one"
    run(small_run(dataset, one, "--max-steps=4", "--grad-accum=4"))
    out = tmp_path / "two-nodes"
    first = launch_two_nodes("static", small_run(dataset, out, "--max-steps=2", "--save-every=1"))
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert "4 rank(s) on cpu" in first[0].stdout and "step 1/2" not in first[1].stdout  # rank 0 is on node 0
    assert [row["step"] for row in metrics(out)] == [1, 2]

    second = launch_two_nodes("c10d", small_run(dataset, out, "--max-steps=4", "--replicate=2", "--resume"))
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-3000:] + second[1].stderr[-3000:]
    logged = "".join(r.stdout for r in second)
    assert logged.count("resumed from") == 1 and "FSDP" not in logged and "HSDP 2 x 2" in logged
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(out)] == pytest.approx([r["loss"] for r in metrics(one)], rel=1e-5)
    for name, tensor in exported(out).items():
        torch.testing.assert_close(tensor, exported(one)[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("case", ["missing", "another"])
def test_a_node_without_the_data_or_with_other_data_is_named_with_its_ranks_and_host(dataset, tmp_path, case):
    """Node 1 is given a dataset path that does not exist there, or a copy whose meta.json differs (as a node
    whose files are out of date): one line from rank 0 names node 1's ranks and host, and nothing is trained."""
    other = tmp_path / "not-on-this-node"
    if case == "another":
        shutil.copytree(dataset, other)
        (other / "meta.json").write_text((other / "meta.json").read_text().replace('"max_len"', '"max_len" '))
    results = launch_two_nodes("static", small_run(dataset, tmp_path / "run"), node_args=((), (f"--data={other}",)))
    assert all(r.returncode != 0 for r in results)
    [error] = [line for r in results for line in r.stderr.splitlines() if line.startswith("error:")]
    host = socket.gethostname()
    assert error.startswith(f"error: ranks 2-3 on {host}: {other / 'meta.json'} is missing" if case == "missing" else
                            f"error: ranks 2-3 on {host} hold another dataset (meta.json's sha256) than rank 0 on "
                            f"{host}: give every node the same files")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# HSDP: the gradient of a step, against FSDP and one float64 process


def test_hsdp_gives_the_gradient_of_fsdp_and_of_one_float64_process_and_reads_a_base_alike(dataset, tmp_path):
    """The collectives of each counted as bench.py scale counts them; a base read a slice per rank of each
    group, new token rows at the mean, as under FSDP."""
    torch.manual_seed(0)
    base_vocab = json.loads((dataset / "meta.json").read_text())["tokenizer"]["base_vocab_size"]
    save_pretrained(Transformer(ModelConfig.from_name("tiny", vocab_size=base_vocab)), tmp_path, max_shard_bytes=100_000)
    result = run(["hsdp", dataset, tmp_path], world=4, script="tests/train_worker.py")
    assert result.stdout.count("HSDP gradient = FSDP gradient = float64 gradient") == 4
    assert result.stdout.count("base loaded") == 4


# ---------------------------------------------------------------------------------------------------------
# A run resumed on another number of ranks


def trained(record, steps=None) -> list[list[int]]:
    """The conversations each step trained on, from tests/train_worker.py's record (one line per rank and
    micro-batch, in order; one micro-batch a rank here), the first `steps` steps."""
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    ranks = sorted({r["rank"] for r in rows})
    per_rank = [[r["conversations"] for r in rows if r["rank"] == rank] for rank in ranks]
    return [sum(step, []) for step in zip(*per_rank)][:steps]


def test_a_run_moves_from_two_ranks_to_one_and_back_training_each_conversation_once(dataset, tmp_path):
    """An epoch begun on 2 ranks, resumed on 1 after step 3 (the rest of the epoch packed for one stream),
    resumed on 2 again after step 9: every conversation of the epoch trained once, the learning rate's
    schedule carried on to where it would have ended."""
    args = ["--epochs=1", "--save-every=1", "--warmup=0"]
    straight = tmp_path / "straight"
    run(small_run(dataset, straight, *args), world=2)
    out, steps = tmp_path / "moved", []
    for world, keep in ((2, 3), (1, 9), (2, None)):  # each leg's run is cut back to its checkpoint `keep`
        record = tmp_path / f"record-{world}-{keep}"
        result = run(["record", record, *small_run(dataset, out, *args, *(["--resume"] if steps else []))],
                     world=world, script="tests/train_worker.py")
        if steps:
            assert "stream(s) a step instead of" in result.stdout
        steps += trained(record, keep and keep - len(steps))
        if keep:
            for later in sorted((out / "checkpoints").glob("step-*"))[keep:]:
                shutil.rmtree(later)
    every = [c for step in steps for c in step]
    assert len(every) == len(set(every))  # no conversation twice in the epoch
    left = set(range(len(train.load_data(dataset)[1].lengths))) - set(every)
    assert len(left) < 10  # what the last step could not give every stream: a few, as in any epoch
    lrs = [row["lr"] for row in metrics(out)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # the cosine goes on down, across both moves
    assert lrs[-1] == pytest.approx(metrics(straight)[-1]["lr"], rel=0.1)  # and ends where it would have


# ---------------------------------------------------------------------------------------------------------
# A rank that never joins


def test_a_job_that_never_forms_times_out_naming_the_rendezvous(dataset, tmp_path):
    port = free_port()
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, small_run(dataset, tmp_path)),
                             "--dist-timeout=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: rank 0 of 2 on {socket.gethostname()}: the job of 2 ranks did not form at "
                            f"127.0.0.1:{port} within 3s")
