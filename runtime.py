"""The process train.py runs in: how many CPU threads a CPU run takes, and the library warnings
that are expected and so silenced. Called by train.main, never at import."""

import os
import time
import warnings
from pathlib import Path

import torch


def set_cpu_threads(threads: int):
    """Threads for a CPU run: `threads`, or $OMP_NUM_THREADS if set (torchrun sets 1), else the
    cores idle at start. Every op waits for its slowest thread, so a thread on a core that another
    process keeps busy slows the whole step: on our 2 cores, beside one busy process, the demo ran
    4,668 tokens/s with 2 threads and 9,834 with 1 (16,762 with 2 on idle cores)."""
    if not threads and "OMP_NUM_THREADS" not in os.environ:
        threads = idle_cores()
    if threads:
        torch.set_num_threads(threads)


def idle_cores(seconds: float = 0.3) -> int:
    """The cores of this machine left idle by other processes over a short look at /proc/stat
    (Linux), at least 1 and at most the cores this process may use."""
    def idle_and_total():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle, total = idle_and_total()
    time.sleep(seconds)
    idle2, total2 = idle_and_total()
    idle_share = (idle2 - idle) / max(1, total2 - total)
    return max(1, min(len(os.sched_getaffinity(0)), round(idle_share * os.cpu_count())))


def silence_expected_warnings():
    """train.py saves a world of one's checkpoints with DCP's no_dist (the same files, without the
    collectives that, on torch 2.13 with gloo, left every later step about twice as slow on our
    2-core CPU); DCP then warns at every save that it "assumes a single process", which is the
    intent."""
    warnings.filterwarnings("ignore",
                            message="torch.distributed is disabled, unavailable or uninitialized")
