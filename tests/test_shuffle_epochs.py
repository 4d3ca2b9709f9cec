"""Shuffled epochs are charged by the epochs the steps drew from, not only by the step count.

The accountant charges one Gaussian release per shuffled epoch (each example is in one batch
of each permutation). ceil(steps / floor(N/B)) under-counted where a loop received batches it
never stepped on (a peek: the permutation runs ahead of the steps) and where one ledger went on
under a fresh permutation (each permutation uses every example again). Each shuffled step now
records the newest epoch the loop had received and the permutation's lineage
(lazydp/shuffle_epochs.py); in every test, no example is used in more epochs than charged.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lazydp import PrivacyError
from lazydp.ledger import PrivacyLedger, StepEvent
from lazydp.shuffle_epochs import ShuffledEpochs
from tests.test_engine_errors import private
from tests.test_resume_checks import _shuffled, _train_on


def _uses(seen):
    return max(seen.count(i) for i in set(seen))


def _epochs(engine):
    (group,) = engine.ledger.mechanism_counts()
    return group.epochs


def test_a_peek_before_the_loop_is_charged_as_the_epoch_it_moves_into(tmp_path):
    # 8 batches per epoch. The peeked batch is never stepped on, so 8 steps take the other 7 of
    # epoch 0 and the first of epoch 1: that batch's examples are used twice, where
    # ceil(8 / 8) = 1 release was charged.
    model, opt, dl, engine = _shuffled(tmp_path)
    next(iter(dl))  # e.g. to look at the shapes
    seen: list[int] = []
    for _ in range(2):
        _train_on(model, opt, itertools.islice(dl, 8 - len(seen) // 5), seen)
    assert engine.ledger.steps == 8 and _uses(seen) == 2
    assert _epochs(engine) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_a_plain_loop_is_charged_exactly_its_epochs(tmp_path, workers):
    # Workers drawing ahead of the loop (into the next epoch) charge nothing more.
    options = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
    model, opt, dl, engine = _shuffled(tmp_path, **options)
    seen: list[int] = []
    for _ in range(2):
        _train_on(model, opt, dl, seen)
    assert engine.ledger.steps == 16 and _uses(seen) == 2 == _epochs(engine)
    _train_on(model, opt, itertools.islice(dl, 3), seen)  # a third epoch begun
    assert _epochs(engine) == 3


def test_a_ledger_continued_under_a_fresh_permutation_charges_both(tmp_path):
    # Half an epoch, then a new engine on the same ledger without the checkpoint: its sampler
    # starts a new permutation (here the same seed, so the very same batches) and uses every
    # example again, where ceil(8 / 8) = 1 release was charged.
    seen: list[int] = []
    for _ in range(2):
        model, opt, dl, engine = _shuffled(tmp_path)
        _train_on(model, opt, itertools.islice(dl, 4), seen)
    assert engine.ledger.steps == 8 and _uses(seen) == 2 == _epochs(engine)
    again = PrivacyLedger(tmp_path / "run.jsonl")  # read back from the file: the same count
    assert again.mechanism_counts()[0].epochs == 2


def test_a_resume_from_the_checkpoint_continues_the_lineage(tmp_path):
    model, opt, dl, engine = _shuffled(tmp_path)
    seen: list[int] = []
    _train_on(model, opt, itertools.islice(dl, 4), seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    model, opt, dl, engine = _shuffled(tmp_path)
    engine.load_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, dl, seen)
    assert engine.ledger.steps == 8 and _uses(seen) == 1 == _epochs(engine)


def _with_workers(workers):
    return {"num_workers": workers, "prefetch_factor": 2} if workers else {}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_peek_then_a_checkpoint_does_not_hand_out_a_stepped_batch_again(tmp_path, workers):
    # A step is matched with the oldest batch the loop received (the peeked one), so the
    # checkpoint's "received, not stepped" batch was the one the third step took: the resume
    # handed it out again (2 uses, 1 release). No batch at or before the newest one a step
    # recorded is handed out again now.
    model, opt, dl, engine = _shuffled(tmp_path, **_with_workers(workers))
    seen: list[int] = []
    next(iter(dl))
    it = iter(dl)
    _train_on(model, opt, itertools.islice(it, 3), seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    del it
    model, opt, dl, engine = _shuffled(tmp_path, **_with_workers(workers))
    engine.load_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, dl, seen)
    assert _uses(seen) == 1 == _epochs(engine)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_lost_after_the_checkpoint_does_not_misalign_the_resume(tmp_path, workers):
    # After the checkpoint the lost run stepped on batches 2, 4, 5 (3 was fetched, then the
    # loop stopped). Skipping the 3 charged steps in order skipped 2, 3, 4 and handed 5 out
    # again. The resume now skips past the newest position the ledger recorded.
    model, opt, dl, engine = _shuffled(tmp_path, **_with_workers(workers))
    seen: list[int] = []
    _train_on(model, opt, itertools.islice(dl, 2), seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    for i, batch in enumerate(dl):  # a stop check after the fetch
        if i == 1:
            break
        _train_on(model, opt, [batch], seen)
    _train_on(model, opt, itertools.islice(dl, 2), seen)  # ... then a crash
    model, opt, dl, engine = _shuffled(tmp_path, **_with_workers(workers))
    engine.load_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, dl, seen)
    assert _uses(seen) <= _epochs(engine) and _uses(seen) == 1


def test_a_roll_back_in_process_while_holding_a_batch_does_not_hand_it_out_again(tmp_path):
    model, opt, dl, engine = _shuffled(tmp_path)
    seen: list[int] = []
    _train_on(model, opt, dl, seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, dl, seen)
    held = next(iter(dl))
    engine.load_checkpoint(tmp_path / "ck.pt")  # e.g. a NaN guard rolling back
    _train_on(model, opt, [held], seen)
    for _ in range(2):
        _train_on(model, opt, itertools.islice(dl, 1), seen)
    assert _uses(seen) <= _epochs(engine) == 3


def _sigma(tmp_path, sigma):
    ds = TensorDataset(torch.arange(40.0)[:, None])
    return private(
        "dpsgd_f",
        torch.nn.Linear(1, 1),
        data_loader=DataLoader(ds, batch_size=5),
        sampler="shuffle",
        noise_multiplier=sigma,
        ledger_path=tmp_path / "run.jsonl",
    )


def test_noise_changed_at_an_epoch_boundary_charges_each_setting_its_own_epochs(tmp_path):
    seen: list[int] = []
    for sigma, epochs, checkpoint in ((1.0, 3, None), (2.0, 2, "a.pt"), (1.0, 1, "b.pt")):
        model, opt, dl, engine = _sigma(tmp_path, sigma)
        if checkpoint:
            engine.load_checkpoint(tmp_path / checkpoint)
        for _ in range(epochs):
            _train_on(model, opt, dl, seen)
        engine.save_checkpoint(tmp_path / ("a.pt" if sigma == 1.0 else "b.pt"))
    charged = {g.noise_multiplier: g.epochs for g in engine.ledger.mechanism_counts()}
    assert charged == {1.0: 4, 2.0: 2} and _uses(seen) == 6


def test_a_checkpoint_from_before_positions_replays_its_batches(tmp_path):
    # Its replay lists the batches alone; they are found in the permutation again.
    options = {"num_workers": 1, "prefetch_factor": 2}
    model, opt, dl, engine = _shuffled(tmp_path, **options)
    seen: list[int] = []
    _train_on(model, opt, itertools.islice(dl, 3), seen)  # the worker drew 2 more
    engine.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert [p for p, _ in state["sampler"]["replay"]] == [3, 4]
    state["sampler"]["replay"] = [b for _, b in state["sampler"]["replay"]]
    del state["sampler"]["lineage"]
    torch.save(state, tmp_path / "old.pt")
    model, opt, dl, engine = _shuffled(tmp_path)
    engine.load_checkpoint(tmp_path / "old.pt")
    _train_on(model, opt, dl, seen)
    assert sorted(seen) == list(range(40))


def _line(**fields):
    event = {"kind": "step", "step": 0, "sample_rate": 0.125, "noise_multiplier": 1.0, "rank": 0}
    return {**event, "max_grad_norm": 1.0, "mode": "dpsgd_f", "sampler": "shuffle", **fields}


def test_ledger_lines_keep_the_position_and_older_lines_load_without_it(tmp_path):
    path = tmp_path / "run.jsonl"
    with PrivacyLedger(path) as ledger:
        ledger.charge(StepEvent(0, 0.125, 1.0, 1.0, "dpsgd_f", "shuffle", position=26, lineage="a"))
        ledger.charge(StepEvent(1, 0.125, 1.0, 1.0, "dpsgd_f", "shuffle"))  # an older line
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert (lines[1]["position"], lines[1]["lineage"]) == (26, "a") and "position" not in lines[2]
    again = PrivacyLedger(path)
    assert again.mechanism_counts()[0].epochs == 4  # epochs 0-3 of "a" (8 batches an epoch)
    assert again.last_position("a") == 26 and again.last_position("b") is None


@pytest.mark.parametrize(
    "bad",
    [
        {"position": -1, "lineage": "ab"},
        {"position": True, "lineage": "ab"},
        {"position": 1},
        {"lineage": "ab"},
        {"position": 1, "lineage": ""},
        {"position": 1, "lineage": "ab", "sampler": "poisson"},
    ],
)
def test_a_malformed_position_in_a_ledger_line_is_refused(tmp_path, bad):
    path = tmp_path / "run.jsonl"
    PrivacyLedger(path).close()
    with open(path, "a") as f:
        f.write(json.dumps(_line(position=3, lineage="ab")) + "\n")  # the good line loads
    PrivacyLedger(path).close()
    with open(path, "a") as f:
        f.write(json.dumps(_line(**bad)) + "\n")
    with pytest.raises(PrivacyError, match="line 3"):
        PrivacyLedger(path)


def test_a_group_that_takes_over_a_lineage_starts_after_its_newest_position():
    # Noise changed at an epoch boundary on resume (8 batches an epoch): the resumed loader
    # hands out nothing at or before the newest recorded position, 23 (epoch 2's last).
    epochs = ShuffledEpochs()
    for position in range(24):
        epochs.record("sigma 1", "p", position, 8)
    for position in range(24, 40):
        epochs.record("sigma 2", "p", position, 8)
    for position in range(40, 48):  # and back
        epochs.record("sigma 1", "p", position, 8)
    assert (epochs.releases("sigma 1"), epochs.releases("sigma 2")) == (4, 2)
    assert epochs.releases("unseen") == 0
