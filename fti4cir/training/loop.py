"""The one training loop, shared by the FTI4CIR trainer (`training.trainer`) and both M2C stages
(`training.m2c.train`): epochs of steps, the learning-rate schedule, mixed precision, per-epoch loss sums and
records, a progress bar, and checkpoints from which a killed run (kill -9 included) resumes bit for bit.

A run is a `Loop` (what to train and how an epoch goes) and a `LoopState` (where it stands). `Loop.start` seeds the
RNGs and, given a checkpoint's commit record, puts back the network, optimizer, GradScaler and RNG states and the
state of that commit; `Loop.run` trains from there to the last epoch. Checkpoints (`training.checkpoint`): at every
epoch end and every `checkpoint_steps` steps inside an epoch, `checkpoint-<step>.safetensors` (network + optimizer
tensors) then the commit record `checkpoint.json` (the state, optimizer hyper-parameters, GradScaler and RNG states,
the run's own fields such as its settings and data digest), both written atomically, tensors first.

The caller gives the batches of an epoch from a given step on (a pure function of the epoch, so that a resumed run
sees the same ones) and the optimisation step; `optimisation_step` is the common part of one (zero_grad, forward
under autocast, backward (scaled by a GradScaler for fp16), an optional gradient reduction, the optimizer step).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from .checkpoint import (
    read_record,
    remove_stale_tensors,
    restore_state_tensors,
    rng_state,
    seed_everything,
    set_rng_state,
    write_state_tensors,
)

CHECKPOINT = "checkpoint.json"  # the commit record in a run directory
STEPS = "steps"  # key of LoopState.sums: the steps of the epoch that had a loss
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---- precision --------------------------------------------------------------------------------------------------
def autocast(device: torch.device | str, precision: str | None):
    """Autocast to "fp16" or "bf16" on `device`'s type; None: full precision (a no-op context)."""
    if precision is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def optimisation_step(
    optimizer: torch.optim.Optimizer,
    loss: Callable[[], Any],
    *,
    device=None,
    precision: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    reduce_gradients: Callable[[], None] | None = None,
):
    """One step: zero_grad, `loss()` (loss terms with a `.total`, or None: nothing to learn from, no step) under
    autocast, backward (through `scaler` when given: fp16), `reduce_gradients()` (e.g. summed over processes), the
    optimizer step. Returns the loss terms (None when there were none)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        terms = loss()
    if terms is None:
        return None
    (terms.total if scaler is None else scaler.scale(terms.total)).backward()
    if reduce_gradients is not None:
        reduce_gradients()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return terms


# ---- state and checkpoints --------------------------------------------------------------------------------------
@dataclass
class LoopState:
    epoch: int = 0  # finished epochs
    step_in_epoch: int = 0  # finished steps of the current epoch
    global_step: int = 0
    sums: dict = field(default_factory=dict)  # loss-term sums of the current epoch (+ STEPS: steps with a loss)
    history: list = field(default_factory=list)  # one record per finished epoch

    def means(self) -> dict[str, float]:
        """Mean loss terms of the current epoch's steps that had a loss."""
        done = max(1, self.sums.get(STEPS, 0))
        return {k: v / done for k, v in self.sums.items() if k != STEPS}


def read_checkpoint(run_dir: str | os.PathLike) -> dict | None:
    """The commit record of a run directory, None when it has none yet."""
    return read_record(Path(run_dir) / CHECKPOINT)


# ---- the loop ---------------------------------------------------------------------------------------------------
@dataclass
class Loop:
    net: torch.nn.Module  # the module whose state the checkpoints hold (the trained part, and any buffers it keeps)
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    batches: Callable[[int, int], Iterable]  # (epoch, first step) -> the epoch's batches from that step on
    step: Callable[[int, int, Any], dict | None]  # (epoch, step in epoch, batch) -> {term: float} or None (no loss)
    epoch_record: Callable[[int, LoopState, float], dict]  # (epoch, state, seconds) -> its history record
    lr: Callable[[int, int], float] | None = None  # (epoch, global step) -> the step's learning rate
    run_dir: Path | None = None  # where checkpoints go (None: no checkpoints)
    record: dict = field(default_factory=dict)  # the run's own fields in every commit record (settings, digests)
    scaler: torch.amp.GradScaler | None = None  # checkpointed with the rest
    checkpoint_steps: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    writes: bool = True  # whether this process writes the checkpoints (False: not the main one of several)
    on_epoch_end: Callable[[int, LoopState], None] | None = None  # after an epoch's record, before its checkpoint
    progress: bool = True
    describe: Callable[[int], str] = lambda epoch: f"epoch {epoch + 1}"  # progress-bar label of an epoch
    postfix: Callable[[LoopState], dict] | None = None  # progress-bar figures after a step
    unit: str = "step"
    leave: bool = True  # keep each epoch's finished progress bar

    def start(self, seed: int, record: dict | None = None) -> LoopState:
        """Seed every RNG; with a commit record, restore the network, optimizer, GradScaler and RNG states it holds
        and return its state (else a fresh one)."""
        seed_everything(seed)
        if record is None:
            return LoopState()
        restore_state_tensors(self.run_dir, record, self.net, self.optimizer)
        if self.scaler is not None and record.get("scaler"):
            self.scaler.load_state_dict(record["scaler"])
        set_rng_state(record["rng"])
        return LoopState(*(record[f.name] for f in dataclasses.fields(LoopState)))

    def save(self, state: LoopState) -> None:
        """A checkpoint of `state`: tensors, then the commit record (a kill at any moment leaves the previous one)."""
        if self.run_dir is None or not self.writes:
            return
        name, optimizer_state = write_state_tensors(self.run_dir, state.global_step, self.net, self.optimizer)
        record = {
            "format": 1,
            **self.record,
            "tensors": name,
            **dataclasses.asdict(state),
            "optimizer": optimizer_state,
        }
        if self.scaler is not None:
            record["scaler"] = self.scaler.state_dict()
        record["rng"] = rng_state()
        write_json_atomic(self.run_dir / CHECKPOINT, record, indent=None)  # the commit
        remove_stale_tensors(self.run_dir, name)

    def run(self, state: LoopState) -> LoopState:
        """Train from `state` to the last epoch (nothing when the run is complete); returns the final state."""
        for epoch in range(state.epoch, self.epochs):
            started = time.perf_counter()
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=state.step_in_epoch,
                desc=self.describe(epoch),
                unit=self.unit,
                leave=self.leave,
                disable=not self.progress,
            )
            for batch in self.batches(epoch, state.step_in_epoch):
                if self.lr is not None:
                    lr = self.lr(epoch, state.global_step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                terms = self.step(epoch, state.step_in_epoch, batch)
                if terms is not None:
                    for name, value in terms.items():
                        state.sums[name] = state.sums.get(name, 0.0) + value
                    state.sums[STEPS] = state.sums.get(STEPS, 0) + 1
                state.step_in_epoch += 1
                state.global_step += 1
                if self.postfix is not None:
                    bar.set_postfix(self.postfix(state), refresh=False)
                bar.update()
                if (
                    self.checkpoint_steps
                    and state.global_step % self.checkpoint_steps == 0
                    and state.step_in_epoch < self.steps_per_epoch
                ):
                    self.save(state)
            bar.close()
            state.history.append(self.epoch_record(epoch, state, time.perf_counter() - started))
            state.epoch, state.step_in_epoch, state.sums = epoch + 1, 0, {}
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, state)
            self.save(state)
        return state
