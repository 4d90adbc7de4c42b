"""Resumable checkpoints of a run directory (torch.distributed.checkpoint): the model and the
optimizer, sharded as they are, with where the run stood, saved whole or not at all and loaded on
any number of ranks; and the run directory itself, which holds one run.

Read top to bottom: what a checkpoint holds besides the model and the optimizer; the run directory;
the Checkpointer (saving after a step, loading the newest that loads, finishing a resume).
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from infra.files import read_json, short_write_reason, write_failed, write_text
from infra.job import JobError
from infra.run_plan import EpochReplan, Position, RunPlan, ScheduleMap, describe_world_change


@dataclass
class SavedProgress:
    """What a checkpoint holds besides the model and the optimizer: where the run stood, the world
    that saved it, and what its plan needs to go on (infra/run_plan.py)."""
    position: Position
    world: int
    grad_accum: int
    epoch_replan: EpochReplan  # of position.epoch
    schedule: ScheduleMap
    peak_lr: float  # 0: not saved (a checkpoint from before it was)


# --------------------------------------------------------------------------------------------------
# The run directory


def check_run_directory(out: Path, resume: bool, data: str, data_sha: str):
    """Checks that a run directory holds one run: a new run refuses one that holds another (its
    config.json), and --resume refuses other data than the run's own (its meta.json's hash)."""
    if not (out / "config.json").exists():
        return
    if not resume:
        raise FileExistsError(f"{out} already holds a run: --resume continues it; another --out "
                              f"starts a new one")
    config = read_json(out / "config.json")
    if config.get("dataset_meta_sha256") != data_sha:
        raise ValueError(f"--resume: {out} was trained on {config['data']}, and "
                         f"{data}/meta.json is not that dataset's: resume with the run's own data")


def keep_metrics_up_to(path: Path, step: int):
    """Drops the rows of metrics.jsonl logged after `step`, the checkpoint resumed from (they are
    logged again)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text(path, "".join(r + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------
# The Checkpointer


class Checkpointer:
    """The checkpoints of one run directory, out/checkpoints/step-N. Written to .tmp-step-N and
    renamed when every rank has finished: a run killed while saving leaves only a .tmp folder, which
    is never resumed from."""

    def __init__(self, out: Path, model, optimizer, save_every: int, keep_last: int):
        self.folder = out / "checkpoints"
        self.model = model
        self.optimizer = optimizer
        self.save_every = save_every
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        return sorted(self.folder.glob("step-*"))

    def after_step(self, position: Position, plan: RunPlan, peak_lr: float, grad_accum: int,
                   stop: bool):
        """Saves a checkpoint if one is due after this step: every save_every steps, at each
        epoch's end, at the run's end, and when the run stops on a signal."""
        every = self.save_every and position.step % self.save_every == 0
        epoch_done = position.step_in_epoch == len(plan.epochs[position.epoch])
        if every or epoch_done or position.step == plan.total_steps or stop:
            self.save(position, plan, peak_lr, grad_accum)

    def save(self, position: Position, plan: RunPlan, peak_lr: float, grad_accum: int):
        """Saves the model, the optimizer and the run's SavedProgress; a failure (a full disk)
        leaves the earlier checkpoints untouched and is one error on every rank."""
        rank, world = dist.get_rank(), dist.get_world_size()
        target = self.folder / f"step-{position.step:08d}"
        tmp = target.with_name(f".tmp-{target.name}")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        replan, schedule = plan.replan_of(position.epoch), plan.schedule
        state = {"model": model_state, "optimizer": optimizer_state,
                 "progress": torch.tensor([position.step, position.epoch, position.step_in_epoch,
                                           world, grad_accum]),
                 "epoch_start": torch.from_numpy(replan.trained.astype(np.uint8)),
                 "schedule": torch.tensor([replan.old_steps, schedule.step0, schedule.start,
                                           schedule.pace, peak_lr], dtype=torch.float64),
                 f"rng_rank{rank}": torch.get_rng_state()}
        try:
            # A world of one saves with no_dist: the same files, without the collectives that, on
            # torch 2.13 with gloo, left every later step about twice as slow on our 2-core CPU.
            dcp.save(state, checkpoint_id=tmp, no_dist=world == 1)
        except (Exception, dcp.CheckpointException) as e:
            raise JobError(f"saving checkpoint {target} failed: {save_failure(tmp, e)}; the "
                           f"previous checkpoints are intact") from None
        dist.barrier()
        if rank == 0:
            os.rename(tmp, target)
            if self.keep_last:
                for old in self.complete()[:-self.keep_last]:
                    shutil.rmtree(old)
        dist.barrier()

    def load(self, path: Path, conversations: int) -> SavedProgress:
        """Loads the model and optimizer resharded for this world size by
        torch.distributed.checkpoint, whatever the world size that saved them, and this rank's
        random stream where the checkpoint holds one (nothing in a step draws from it)."""
        rank, no_dist = dist.get_rank(), dist.get_world_size() == 1
        held = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        plan_state = {"progress": torch.zeros(5, dtype=torch.long),
                      "epoch_start": torch.zeros(conversations, dtype=torch.uint8),
                      "schedule": torch.tensor([0, 0, 0, 1, 0], dtype=torch.float64)}
        dcp.load({k: v for k, v in plan_state.items() if k in held}, checkpoint_id=path,
                 no_dist=no_dist)  # a checkpoint saved before epoch_start and schedule: their zeros
        step, epoch, step_in_epoch, world, grad_accum = plan_state["progress"].tolist()
        old_steps, step0, start, pace, peak_lr = plan_state["schedule"].tolist()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if f"rng_rank{rank}" in held:
            state[f"rng_rank{rank}"] = torch.get_rng_state()
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if f"rng_rank{rank}" in state:
            torch.set_rng_state(state[f"rng_rank{rank}"])
        trained = plan_state["epoch_start"].numpy().astype(bool)
        return SavedProgress(Position(step, epoch, step_in_epoch), world, grad_accum,
                             EpochReplan(int(old_steps), trained), ScheduleMap(step0, start, pace),
                             peak_lr)

    def load_newest(self, conversations: int, log) -> SavedProgress:
        """Loads the newest complete checkpoint that loads: a damaged one (a truncated file, an
        empty .metadata) is named, renamed damaged-step-N, and the one before it tried."""
        checkpoints = self.complete()
        if not checkpoints:
            raise JobError(f"--resume: no complete checkpoint in {self.folder}")
        for path in reversed(checkpoints):
            try:
                saved = self.load(path, conversations)
            except (Exception, dcp.CheckpointException) as e:  # CheckpointException: BaseException
                log(f"checkpoint {path} does not load ({type(e).__name__}: {str(e)[:200]}); kept "
                    f"as damaged-{path.name}, trying the one before")
                if dist.get_rank() == 0:  # kept for a look, never resumed from; its step saved anew
                    os.rename(path, path.with_name(f"damaged-{path.name}"))
                dist.barrier()
                continue
            log(f"resumed from {path}: step {saved.position.step}, epoch "
                f"{saved.position.epoch + 1}")
            return saved
        raise JobError(f"--resume: none of the {len(checkpoints)} checkpoints in {self.folder} "
                       f"loads")

    def finish_resuming(self, saved: SavedProgress, plan: RunPlan, grad_accum: int, exports, log):
        """Finishes a resume once the plan is made: says what changed with the world size, writes
        again the checkpoint's export if the run stopped while writing it (exports: an
        infra/exports.py Exporter), and cuts metrics.jsonl back to the checkpoint."""
        world = dist.get_world_size()
        if (saved.world, saved.grad_accum) != (world, grad_accum):
            log(describe_world_change(saved, grad_accum, world, plan))
        exports.rewrite_unfinished(saved.position, plan, log)
        if dist.get_rank() == 0 and saved.position.step < plan.total_steps:
            keep_metrics_up_to(self.folder.parent / "metrics.jsonl", saved.position.step)


def save_failure(tmp: Path, e: BaseException) -> str:
    """Says why a save failed, in words, and removes what it had written. DCP's CheckpointException
    carries each failed rank's exception."""
    failures = getattr(e, "failures", None)
    cause = next(iter(failures.values()))[0] if failures else e
    written = write_failed(tmp, cause)  # before the partial files go, and the room they take
    reason = written.reason if written else short_write_reason(tmp)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return reason or str(cause).splitlines()[0]
