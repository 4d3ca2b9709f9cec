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

from lazydp import PrivacyError
from lazydp.ledger import PrivacyLedger, StepEvent
from lazydp.shuffle_epochs import ShuffledEpochs
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


def _line(**fields):
    event = {"kind": "step", "step": 0, "sample_rate": 0.125, "noise_multiplier": 1.0}
    return {**event, "max_grad_norm": 1.0, "mode": "dpsgd_f", "sampler": "shuffle", **fields}


def test_ledger_lines_keep_the_epoch_and_older_lines_load_without_it(tmp_path):
    path = tmp_path / "run.jsonl"
    with PrivacyLedger(path) as ledger:
        ledger.charge(StepEvent(0, 0.125, 1.0, 1.0, "dpsgd_f", "shuffle", epoch=3, lineage="ab"))
        ledger.charge(StepEvent(1, 0.125, 1.0, 1.0, "dpsgd_f", "shuffle"))  # an older line
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert (lines[1]["epoch"], lines[1]["lineage"]) == (3, "ab") and "epoch" not in lines[2]
    assert PrivacyLedger(path).mechanism_counts()[0].epochs == 4  # epochs 0-3 of "ab"


@pytest.mark.parametrize(
    "bad",
    [{"epoch": -1, "lineage": "ab"}, {"epoch": 1}, {"lineage": "ab"}, {"epoch": 1, "lineage": ""}],
)
def test_a_malformed_epoch_in_a_ledger_line_is_refused(tmp_path, bad):
    path = tmp_path / "run.jsonl"
    PrivacyLedger(path).close()
    with open(path, "a") as f:
        f.write(json.dumps(_line(**bad)) + "\n")
    with pytest.raises(PrivacyError, match="line 2"):
        PrivacyLedger(path)


def test_a_group_that_takes_over_a_lineage_starts_one_epoch_below_its_first():
    # Noise changed at an epoch boundary on resume: the new group's first batches may be the
    # checkpoint's kept ones, from the epoch before.
    epochs = ShuffledEpochs()
    for epoch in (0, 1, 2):
        epochs.record("sigma 1", "p", epoch)
    for epoch in (3, 4):
        epochs.record("sigma 2", "p", epoch)
    assert (epochs.releases("sigma 1"), epochs.releases("sigma 2")) == (3, 3)
    assert epochs.releases("unseen") == 0
