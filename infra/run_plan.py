"""The plan of a training run, the same on every rank: each epoch's optimizer steps, packed by
data.py's multipack into one stream per rank and micro-batch, and where the learning rate's schedule
stands at each step. Made at the start of a run, or from a checkpoint, on the same number of streams
per step (the plan goes on unchanged) or on another (the rest of the epoch is packed anew).

Read top to bottom: where a run is (Position); packing an epoch; the plan; re-planning a resumed
run; what the run trains on, fingerprinted.
"""

import hashlib
from dataclasses import dataclass, replace

import numpy as np

import data


@dataclass(frozen=True)
class Position:
    """Where a run is: optimizer steps done, the epoch, and the steps done of that epoch's plan."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def after_step(self) -> "Position":
        return Position(self.step + 1, self.epoch, self.step_in_epoch + 1)


@dataclass
class EpochReplan:
    """An epoch re-planned midway (a run resumed on another number of streams per step): its first
    `old_steps` steps were planned for the old number and trained the conversations flagged in
    `trained`; the plan packs the rest. An epoch planned whole: no step, no conversation."""
    old_steps: int
    trained: np.ndarray  # one bool per conversation


@dataclass
class ScheduleMap:
    """Maps the run's optimizer steps onto the learning rate's schedule: optimizer step `step` runs
    at schedule step start + (step - step0) * pace. A run keeps (0, 0, 1); a resume with another
    number of streams per step, whose steps are then more or fewer, re-anchors it so that the
    schedule goes on from where it was to where it would have ended."""
    step0: float = 0.0
    start: float = 0.0
    pace: float = 1.0

    def schedule_step(self, step: int) -> float:
        return self.start + (step - self.step0) * self.pace


def pack_epoch(split: data.Split, cfg, world_size: int, epoch: int,
               trained: np.ndarray | None = None) -> list:
    """Packs one epoch's optimizer steps: multipack into world_size × cfg.grad_accum bins per step;
    rank r takes bins r·grad_accum … r·grad_accum + grad_accum - 1 as its micro-batches. The same
    on every rank. `trained`: the conversations the epoch has trained on already (a run resumed with
    another number of streams per step), left out."""
    left = np.arange(len(split.lengths)) if trained is None else np.flatnonzero(~trained)
    try:
        steps = data.multipack(split.lengths[left], cfg.batch_max_len,
                               world_size * cfg.grad_accum, cfg.seed, epoch)
    except ValueError as e:
        raise ValueError(f"{cfg.data}: {e}; raise --batch-max-len or prepare the data with a "
                         f"smaller max_len") from None
    return steps if trained is None else [[left[b].tolist() for b in bins] for bins in steps]


@dataclass
class RunPlan:
    """The whole run's plan, the same on every rank: each epoch's steps (their bins of
    conversations), the epoch re-planned on resuming, the schedule map, and the per-conversation
    sums that the steps' weight sums and statistics are read from."""
    epochs: list  # per epoch, per step (None: done before a re-plan), per stream: conversations
    replanned: tuple[int, EpochReplan] | None  # the epoch resumed in, and how its plan begins
    total_steps: int
    schedule: ScheduleMap
    conversation_weight: np.ndarray  # Σ w of each conversation (train.conversation_weights)
    conversation_supervised: np.ndarray  # tokens with w ≠ 0 in each conversation
    supervised_per_step: float

    def replan_of(self, epoch: int) -> EpochReplan:
        if self.replanned and self.replanned[0] == epoch:
            return self.replanned[1]
        return EpochReplan(0, np.zeros(len(self.conversation_weight), dtype=bool))

    def steps(self, position: Position):
        """Yields (position before the step, the step's bins) for every step left from `position`.
        """
        while position.step < self.total_steps:
            if position.step_in_epoch >= len(self.epochs[position.epoch]):  # the epoch is over
                position = Position(position.step, position.epoch + 1, 0)
                continue
            yield position, self.epochs[position.epoch][position.step_in_epoch]
            position = position.after_step()


def make_plan(split: data.Split, cfg, conversation_weight: np.ndarray, epochs: list,
              position: Position, replanned, schedule: ScheduleMap) -> RunPlan:
    """Makes a RunPlan of the epochs' steps from `position`: the steps done before its epoch, and
    every step of the epochs from it."""
    total_steps = (position.step - position.step_in_epoch
                   + sum(len(p) for p in epochs[position.epoch:]))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    supervised = np.add.reduceat(np.asarray(split.target_weights) != 0, split.offsets)
    steps = [s for p in epochs for s in p if s is not None]
    per_step = sum(supervised[b].sum() for s in steps for b in s) / max(1, len(steps))
    return RunPlan(epochs, replanned, total_steps, schedule, conversation_weight, supervised,
                   per_step)


def plan_run(split: data.Split, cfg, conversation_weight: np.ndarray, world: int,
             saved=None) -> RunPlan:
    """Plans the run from its start, or from a checkpoint's SavedProgress (infra/checkpoint.py)."""
    epochs = [pack_epoch(split, cfg, world, e) for e in range(cfg.epochs)]
    if saved is None:
        return make_plan(split, cfg, conversation_weight, epochs, Position(), None, ScheduleMap())
    if saved.position.epoch >= cfg.epochs:  # a finished run asked for fewer epochs: nothing left
        return make_plan(split, cfg, conversation_weight, epochs, saved.position, None,
                         saved.schedule)
    return replan_resumed(split, cfg, conversation_weight, epochs, world, saved)


def replan_resumed(split, cfg, conversation_weight, epochs, world: int, saved) -> RunPlan:
    """Plans a resumed run. With the same streams per step (ranks × micro-batches) it goes on with
    the saved plan exactly. With another number, the conversations the epoch has not trained on are
    packed for the new streams, as are the later epochs, and the schedule map is re-anchored: every
    conversation still trains once per epoch, and the schedule ends where it would have."""
    resumed_at, replan = saved.position, saved.epoch_replan
    epoch = resumed_at.epoch
    saved_cfg = replace(cfg, grad_accum=saved.grad_accum)
    saved_epoch = pack_epoch(split, saved_cfg, saved.world, epoch,
                             replan.trained if replan.old_steps else None)
    saved_epoch = [None] * replan.old_steps + saved_epoch
    if saved.world * saved.grad_accum == world * cfg.grad_accum:
        epochs[epoch] = saved_epoch
        return make_plan(split, cfg, conversation_weight, epochs, resumed_at, (epoch, replan),
                         saved.schedule)
    later = [pack_epoch(split, saved_cfg, saved.world, e) for e in range(epoch + 1, cfg.epochs)]
    old_total = make_plan(split, saved_cfg, conversation_weight,
                          epochs[:epoch] + [saved_epoch] + later, resumed_at, None,
                          saved.schedule).total_steps
    trained = replan.trained.copy()
    for step in saved_epoch[replan.old_steps:resumed_at.step_in_epoch]:
        for stream in step:
            trained[stream] = True
    if resumed_at.step_in_epoch < len(saved_epoch):
        replan = EpochReplan(resumed_at.step_in_epoch, trained)
        epochs[epoch] = ([None] * resumed_at.step_in_epoch
                         + pack_epoch(split, cfg, world, epoch, trained))
    else:  # the epoch is over: the next one starts from nothing
        epochs[epoch] = saved_epoch
    plan = make_plan(split, cfg, conversation_weight, epochs, resumed_at, (epoch, replan),
                     saved.schedule)
    now = saved.schedule.schedule_step(resumed_at.step)
    left = plan.total_steps - resumed_at.step
    pace = (saved.schedule.schedule_step(old_total) - now) / left if left > 0 else 1.0
    plan.schedule = ScheduleMap(resumed_at.step, now, pace)
    return plan


def describe_world_change(saved, grad_accum: int, world: int, plan: RunPlan) -> str:
    """Says in one line what a resume on another world size keeps and what it cannot."""
    streams, saved_streams = world * grad_accum, saved.world * saved.grad_accum
    line = (f"saved by {saved.world} rank(s) x {saved.grad_accum} micro-batch(es), resumed on "
            f"{world} x {grad_accum}: ")
    if streams == saved_streams:
        line += (f"the same {streams} streams a step, the plan goes on unchanged (its sums in "
                 f"another order: equal to rounding, not bit for bit)")
    else:
        epoch = saved.position.epoch
        left = (len(plan.epochs[epoch]) - saved.position.step_in_epoch
                if epoch < len(plan.epochs) else 0)
        line += (f"{streams} stream(s) a step instead of {saved_streams}: the conversations epoch "
                 f"{epoch + 1} has not trained on ({left} steps now) and the later epochs packed "
                 f"anew, {plan.total_steps:,} steps in all; the learning rate goes on along its "
                 f"schedule")
        if saved_streams % world == 0:
            line += f" (--grad-accum={saved_streams // world} would keep the saved plan)"
    if world > saved.world:
        line += (f"; ranks {saved.world}-{world - 1} start their random streams anew (nothing in "
                 f"a step draws from them)")
    return line


def plan_fingerprint(plan: RunPlan) -> str:
    """Fingerprints what the run will train on: every step's conversations and their Σ w."""
    digest = hashlib.sha256(repr(plan.epochs).encode())
    digest.update(plan.conversation_weight.tobytes())
    return digest.hexdigest()[:16]
