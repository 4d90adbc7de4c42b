"""The processes of a training job, for train.py: forming it (one process, or torchrun's ranks on
one node or many) and taking it down, the CPU threads of each, the errors every rank agrees on (said
once, with the ranks and hosts they came from, where one rank's missing file would otherwise leave
the others waiting), and the signals that stop a run after the step under way.

Read top to bottom: forming the job; who is speaking; failures and values compared across ranks;
stop signals; taking the job down.
"""

import datetime
import gc
import os
import signal
import socket
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from model import default_device


def start_job(timeout_s: float = 1800.0):
    """Forms the process group. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (each node's GPU is
    its local rank); a plain `python train.py` is a world of one, with a process group all the same,
    so that one code path (FSDP2) serves both. NCCL on CUDA, gloo on CPU. A job that does not form
    within timeout_s (a node never started, a port closed between nodes) is an error naming the
    rendezvous."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cuda else "gloo"
    # device_id binds NCCL to this rank's GPU (without it NCCL guesses, and warns, at every barrier)
    device_id = default_device() if cuda else None
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device_id, timeout=timeout)
        return
    try:
        dist.init_process_group(backend, device_id=device_id, timeout=timeout)
    except dist.DistError as e:
        rendezvous = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise TimeoutError(f"the job of {os.environ['WORLD_SIZE']} ranks did not form at "
                           f"{rendezvous} within {timeout_s:g}s ({str(e).splitlines()[0]}): start "
                           f"every node with the same rendezvous address, open its port between "
                           f"the nodes, or raise --dist-timeout") from None


def set_cpu_threads(threads: int):
    """Sets the threads of a CPU run: `threads`, or $OMP_NUM_THREADS if set (torchrun sets 1), else
    the cores idle at start. Every op waits for its slowest thread, so a thread on a core that
    another process keeps busy slows the whole step: on our 2 cores, beside one busy process, the
    demo ran 4,668 tokens/s with 2 threads and 9,834 with 1 (16,762 with 2 on idle cores)."""
    if not threads and "OMP_NUM_THREADS" not in os.environ:
        threads = idle_cores()
    if threads:
        torch.set_num_threads(threads)


def idle_cores(seconds: float = 0.3) -> int:
    """Counts the cores of this machine left idle by other processes over a short look at
    /proc/stat (Linux): at least 1 and at most the cores this process may use."""
    def idle_and_total():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle, total = idle_and_total()
    time.sleep(seconds)
    idle2, total2 = idle_and_total()
    idle_share = (idle2 - idle) / max(1, total2 - total)
    return max(1, min(len(os.sched_getaffinity(0)), round(idle_share * os.cpu_count())))


def silence_expected_warnings():
    """Silences DCP's warning that a save "assumes a single process": a world of one saves its
    checkpoints with no_dist on purpose (infra/checkpoint.py says why)."""
    warnings.filterwarnings("ignore",
                            message="torch.distributed is disabled, unavailable or uninitialized")


# --------------------------------------------------------------------------------------------------
# Who is speaking, and what the ranks agree on


def rank_prefix() -> str:
    """Returns the start of a line one rank prints alone, "rank 1 of 2 on HOST: " (empty in a world
    of one), so that the reader knows which process speaks."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return f"rank {os.environ['RANK']} of {world} on {socket.gethostname()}: " if world > 1 else ""


class JobError(Exception):
    """An error of the whole job, which every rank raises together after a collective: rank 0 alone
    says it."""


def ranks_on_hosts(who: list[tuple[int, str]]) -> str:
    """Names ranks and their hosts: [(0, "a"), (1, "a"), (2, "b"), (5, "b")] → "ranks 0-2, 5 on a,
    b"."""
    runs = []
    for r, _ in who:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    ranks = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
    hosts = ", ".join(sorted({host for _, host in who}))
    return f"rank{'s' if len(who) > 1 else ''} {ranks} on {hosts}"


def gather_from_ranks(value) -> list:
    """Returns each rank's (value, host), on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (value, socket.gethostname()))
    return gathered


def on_every_rank(work):
    """Runs work() on every rank and shares its failure (ValueError, OSError): if any rank failed,
    every rank raises one JobError naming the ranks that failed and their hosts (unless every rank
    failed alike), where one rank's missing file would otherwise leave the others waiting."""
    try:
        result, failure = work(), None
    except (ValueError, OSError) as e:
        result, failure = None, str(e)
    gathered = gather_from_ranks(failure)
    failures = {}
    for rank, (message, host) in enumerate(gathered):
        if message:
            failures.setdefault(message, []).append((rank, host))
    if len(failures) == 1 and len(next(iter(failures.values()))) == len(gathered):
        raise JobError(next(iter(failures)))
    if failures:
        raise JobError("; ".join(f"{ranks_on_hosts(who)}: {message}"
                                 for message, who in failures.items()))
    return result


def check_same_on_every_rank(values: dict):
    """Checks that every rank holds the same of each value (the dataset, the plan): where a node
    reads other files, the ranks would train on different plans and their weight sums disagree."""
    gathered = gather_from_ranks(values)
    first, first_host = gathered[0]
    for name in values:
        odd = [(r, host) for r, (theirs, host) in enumerate(gathered)
               if theirs[name] != first[name]]
        if odd:
            raise JobError(f"{ranks_on_hosts(odd)} hold another {name} than rank 0 on "
                           f"{first_host}: give every node the same files")


# --------------------------------------------------------------------------------------------------
# Stop signals


class StopRequests:
    """Notes SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGINT (Ctrl-C)
    when they come; the loop acts on them at the end of the step they came in, so that every rank
    stops after the same step, with a checkpoint. A second one stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.note)

    def note(self, signum, _frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, device) -> int:
        """Returns the signal any rank has received, 0 if none: one all_reduce of one number."""
        flag = torch.tensor([self.signal], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class Stopped(Exception):
    """The run stopped on a signal, every rank after the same step, its checkpoint saved."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoints: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of "
                         f"{total_steps}: checkpoint {checkpoints / f'step-{step:08d}'}; the same "
                         f"command with --resume continues the run")
        self.signum = signum


# --------------------------------------------------------------------------------------------------
# Taking the job down


def end_job():
    """Destroys the process group once nothing holds its work and every rank is done with it. gloo
    aborted the process ("terminate called without an active exception") now and then when one rank
    tore its connections down while another still used them (1 run in 12 of a 2-rank test without
    the barrier), and once in a test whose sharded model was still alive at the destroy (hence the
    collection first)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
