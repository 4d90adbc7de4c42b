"""The processes of a job, for train.py: forming it (one process, or torchrun's ranks on one node
or many) and taking it down, and the errors every rank agrees on, said once with the ranks and
hosts they came from, where one rank's missing file would otherwise leave the others waiting.

Read top to bottom: forming the job; who is speaking; failures and values compared across ranks;
taking the job down.
"""

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist

from model import default_device


def setup_processes(timeout_s: float = 1800.0):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (each node's GPU is its local rank); a plain
    `python train.py` is a world of one, with a process group all the same, so that one code path
    (FSDP2) serves both. NCCL on CUDA, gloo on CPU. A job that does not form within timeout_s
    (a node never started, a port closed between nodes) is an error naming the rendezvous."""
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


def this_rank() -> str:
    """Who is speaking, for a line one rank prints alone: empty in a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return f"rank {os.environ['RANK']} of {world} on {socket.gethostname()}: " if world > 1 else ""


class EveryRank(Exception):
    """An error every rank raises together, after a collective: rank 0 alone says it."""


def ranks_on_hosts(who: list[tuple[int, str]]) -> str:
    """[(0, "a"), (1, "a"), (2, "b"), (5, "b")] → "ranks 0-2, 5 on a, b"."""
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
    """Each rank's (value, host), on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (value, socket.gethostname()))
    return gathered


def on_every_rank(work):
    """work() on every rank, its failure (ValueError, OSError) shared: if any rank failed, every
    rank raises one EveryRank naming the ranks that failed and their hosts (unless every rank
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
        raise EveryRank(next(iter(failures)))
    if failures:
        raise EveryRank("; ".join(f"{ranks_on_hosts(who)}: {message}"
                                  for message, who in failures.items()))
    return result


def check_same_on_every_rank(values: dict):
    """Every rank must hold the same of each value (the dataset, the plan): where a node reads
    other files, the ranks would train on different plans and their weight sums would disagree."""
    gathered = gather_from_ranks(values)
    first, first_host = gathered[0]
    for name in values:
        odd = [(r, host) for r, (theirs, host) in enumerate(gathered)
               if theirs[name] != first[name]]
        if odd:
            raise EveryRank(f"{ranks_on_hosts(odd)} hold another {name} than rank 0 on "
                            f"{first_host}: give every node the same files")


def shut_down_processes():
    """The process group destroyed once nothing holds its work and every rank is done with it. gloo
    aborted the process ("terminate called without an active exception") now and then when one rank
    tore its connections down while another still used them (1 run in 12 of a 2-rank test without
    the barrier), and once in a test whose sharded model was still alive at the destroy (hence the
    collection first)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
