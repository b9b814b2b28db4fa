"""The shared training loop (fti4cir.training.loop) on a toy network: a run interrupted at any step and resumed from
its last checkpoint ends bit for bit as the uninterrupted one (weights, optimizer, GradScaler, RNG streams, loss sums,
history); steps without a loss are not counted; the schedule is set before every step. The FTI4CIR trainer and both
M2C stages run on it: their kill -9 tests are in tests/test_trainer.py and tests/test_m2c_training.py."""

from dataclasses import dataclass

import pytest
import torch

from fti4cir.training.loop import STEPS, Loop, optimisation_step, read_checkpoint

EPOCHS, STEPS_PER_EPOCH = 3, 4


@dataclass
class Terms:
    total: torch.Tensor

    def detached(self) -> dict[str, float]:
        return {"total": float(self.total.detach()), "twice": 2 * float(self.total.detach())}


class Interrupted(Exception):
    pass


def make_loop(run_dir, *, die_at: int | None = None, lrs: list | None = None) -> Loop:
    """A dropout network on random data drawn from the global RNG (so the RNG state must be restored exactly), an
    enabled GradScaler (its state too), a step without a loss every 5th step, checkpoints every 3 steps."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2)
    calls = [0]

    def batches(epoch, start):
        return ((epoch, step) for step in range(start, STEPS_PER_EPOCH))

    def step(epoch, index, batch):
        assert batch == (epoch, index)
        calls[0] += 1
        if die_at is not None and calls[0] == die_at:
            raise Interrupted
        if lrs is not None:
            lrs.append(optimizer.param_groups[0]["lr"])
        x = torch.randn(5, 6)

        def loss():
            return None if (epoch * STEPS_PER_EPOCH + index) % 5 == 4 else Terms((net(x) ** 2).mean())

        terms = optimisation_step(optimizer, loss, scaler=scaler)
        return None if terms is None else terms.detached()

    return Loop(
        net,
        optimizer,
        EPOCHS,
        STEPS_PER_EPOCH,
        batches,
        step,
        epoch_record=lambda epoch, state, seconds: {"epoch": epoch, **state.means(), "steps": state.sums.get(STEPS, 0)},
        lr=lambda epoch, global_step: 1e-2 / (1 + global_step),
        run_dir=run_dir,
        record={"name": "toy"},
        scaler=scaler,
        checkpoint_steps=3,
        progress=False,
    )


def train(run_dir, **kwargs) -> tuple[Loop, list, torch.Tensor]:
    """(the loop, its history, the global torch RNG state at its end)."""
    loop = make_loop(run_dir, **kwargs)
    state = loop.run(loop.start(seed=7, record=read_checkpoint(run_dir)))
    return loop, state.history, torch.get_rng_state()


def test_resumed_runs_equal_the_uninterrupted_one(tmp_path):
    lrs = []
    straight, history, rng = train(tmp_path / "straight", lrs=lrs)
    assert lrs == [pytest.approx(1e-2 / (1 + s)) for s in range(EPOCHS * STEPS_PER_EPOCH)]
    assert [h["steps"] for h in history] == [4, 3, 3]  # the 5th and the 10th step had no loss
    assert all(h["twice"] == pytest.approx(2 * h["total"]) for h in history)
    record = read_checkpoint(tmp_path / "straight")
    assert (record["name"], record["epoch"], record["global_step"]) == ("toy", EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    assert record["scaler"]["scale"] != 2.0**4  # the scale grew: its state matters
    for die_at in (2, 4, 5, 7, 11):  # mid epoch, at an epoch end, at a step without a loss ...
        run = tmp_path / f"killed-at-{die_at}"
        with pytest.raises(Interrupted):
            train(run, die_at=die_at)
        resumed, resumed_history, resumed_rng = train(run)
        assert resumed_history == history
        assert all(
            torch.equal(a, b) for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values())
        )
        assert resumed.scaler.state_dict() == straight.scaler.state_dict()
        assert torch.equal(resumed_rng, rng)
        assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-000000012.safetensors"]


def test_a_finished_run_trains_no_more(tmp_path):
    first, history, _ = train(tmp_path)
    again, again_history, _ = train(tmp_path)
    assert again_history == history
    assert all(torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()))
