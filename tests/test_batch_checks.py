"""One row of dimension 0 per sampled example, and a real gradient behind every charged step:
checked against the batch the private loader yielded, before anything is charged."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lazydp import ConfigError, InputError
from lazydp.empty_batch import empty_batch
from tests.test_engine_errors import private, snapshot


class SharedTower(nn.Module):
    def __init__(self, joined: bool) -> None:
        super().__init__()
        self.tower = nn.Linear(3, 4)
        self.joined = joined

    def forward(self, q, i):
        if self.joined:  # one call on 2B rows: two rows per example, each clipped alone
            a, b = self.tower(torch.cat([q, i])).chunk(2)
        else:
            a, b = self.tower(q), self.tower(i)
        return (a * b).sum(1)


def _two_tower(joined: bool):
    ds = TensorDataset(torch.randn(64, 3), torch.randn(64, 3), torch.randn(64))
    loader = DataLoader(ds, batch_size=16)
    return private("dpsgd_f", SharedTower(joined), data_loader=loader)


@pytest.mark.parametrize("joined", [True, False])
def test_an_example_spread_over_two_rows_is_refused_before_the_charge(joined):
    model, opt, dl, engine = _two_tower(joined)
    before = snapshot(model)
    q, i, y = next(b for b in dl if len(b[0]))
    opt.zero_grad()
    nn.functional.mse_loss(model(q, i), y).backward()
    if not joined:  # the same tower called once per input: one row per example, trains
        opt.step()
        assert engine.ledger.steps == 1
        return
    with pytest.raises(InputError, match=rf"saw {2 * len(y)} rows.*hold at most {len(y)} examples"):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())


def test_a_loop_that_fetches_ahead_or_drops_examples_still_trains():
    # A prefetcher holds the next batch before the step; a collate_fn may drop bad examples.
    ds = TensorDataset(torch.randn(64, 3), torch.randn(64))
    dl = DataLoader(ds, batch_size=16, collate_fn=lambda b: default_collate(b[1:] or b))
    model, opt, dl, engine = private("dpsgd_f", nn.Linear(3, 1), data_loader=dl)
    it = iter(dl)
    ahead = next(it, None)
    # Dropped examples mean fewer rows than the batch held: allowed, with one warning (the
    # same count is what a time-major layer would show).
    with pytest.warns(UserWarning, match="fewer rows"):
        while ahead is not None:
            (x, y), ahead = ahead, next(it, None)  # the next batch is drawn before this step
            opt.zero_grad()
            if len(x):
                nn.functional.mse_loss(model(x).squeeze(1), y).backward()
            opt.step()
    assert engine.ledger.steps == len(dl)


def test_step_after_a_forward_without_backward_is_refused():
    model, opt, _, engine = private("dpsgd_f")
    before = snapshot(model)
    x = torch.randn(4, 3)
    model(x, torch.randint(0, 40, (4, 3)), torch.randint(0, 40, (4, 2)))
    with pytest.raises(InputError, match="without loss.backward"):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    names: list[str]
    tag: str = "train"


class Opaque:
    def __init__(self, x):
        self.x = x


def _collated(example, collate=default_collate):
    return empty_batch(collate([example]), collate([example, example]))


def test_an_empty_batch_cuts_what_grows_with_the_examples_and_keeps_the_rest():
    batch = Batch(torch.ones(3), ["alice"])
    empty = empty_batch(batch, Batch(torch.ones(3), ["alice", "alice"]))
    assert empty.x.shape == (3,) and empty.names == [] and empty.tag == "train"
    assert _collated({"a": np.ones(2)})["a"].shape == (0, 2)
    ragged = _collated([4, 8, 15], collate=list)  # a per-example list of ids
    assert ragged == []
    counts = defaultdict(int, x=torch.ones(2))
    out = _collated(counts, collate=lambda b: defaultdict(int, x=torch.stack([e["x"] for e in b])))
    assert isinstance(out, defaultdict) and out["x"].shape == (0, 2)
    constant = empty_batch((torch.ones(1, 2), np.int64(7)), (torch.ones(2, 2), np.int64(7)))
    assert constant[0].shape == (0, 2) and constant[1] == 7
    with pytest.raises(ConfigError, match="cannot tell how to cut the collated batch's Opaque"):
        empty_batch([Opaque(1)], [Opaque(2)])


def test_an_empty_poisson_batch_of_an_unknown_type_stops_the_loader():
    ds = TensorDataset(torch.randn(300, 3))
    loader = DataLoader(ds, batch_size=1, collate_fn=lambda b: Opaque(b))
    _, _, dl, _ = private("dpsgd_f", nn.Linear(3, 1), data_loader=loader)
    with pytest.raises(ConfigError, match="empty batch"):  # q = 1/300: an empty batch comes soon
        for _ in dl:
            pass


def test_a_step_without_a_forward_on_a_loaded_batch_is_refused_but_an_empty_one_is_charged():
    # Two bare step() calls used to be charged (and noised) as empty batches, whatever the
    # loader had yielded.
    ds = TensorDataset(torch.randn(64, 3), torch.randn(64))
    model, opt, dl, engine = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, 16))
    before = snapshot(model)
    it = iter(dl)
    x, y = next(it)
    assert len(x) > 0
    with pytest.raises(InputError, match=rf"without a forward.*holds {len(x)} examples"):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())
    nn.functional.mse_loss(model(x).squeeze(1), y).backward()  # the forgotten forward: fine
    opt.step()
    assert engine.ledger.steps == 1
    dl._yielded.append(
        (0, [])
    )  # as if the loader yielded an empty Poisson batch: no forward needed
    opt.step()
    assert engine.ledger.steps == 2


def _train_on(model, opt, batches):
    """One step per batch: forward and backward on a loaded one, a bare step on an empty one."""
    for x, y in batches:
        if len(x):
            nn.functional.mse_loss(model(x).squeeze(1), y).backward()
        opt.step()
        opt.zero_grad()


def test_a_loop_over_a_cached_epoch_or_after_a_peek_steps_on_every_batch():
    # With one expected example per batch about a third of the Poisson batches are empty. The
    # loader used to keep only the last 64 sizes: a cached epoch of 300 batches ran out of sizes
    # after 64 steps and its next empty batch was refused as a second step for one batch; a
    # batch peeked at before the loop made the first empty batch's bare step a "forgotten
    # forward" of the peeked batch.
    ds = TensorDataset(torch.randn(300, 3), torch.randn(300))
    model, opt, dl, engine = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, 1))
    cached = list(dl)
    assert len(cached) == 300 and sum(len(x) == 0 for x, _ in cached) > 64
    _train_on(model, opt, cached)
    assert engine.ledger.steps == 300

    model, opt, dl, engine = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, 1))
    peeked = next(b for b in dl if len(b[0]))  # e.g. to look at shapes; never stepped on
    assert len(peeked[0])
    peek_draws = dl.batches_drawn  # the sampler's epoch goes on where the peek left it
    _train_on(model, opt, dl)
    assert engine.ledger.steps == dl.batches_drawn - peek_draws > 0


def test_a_second_step_for_one_batch_is_refused_but_a_hand_built_loop_may_step_bare():
    # backward(); step(); step() used to charge (and noise) the second step as an empty batch:
    # budget spent on nothing. A loop that never draws from the private loader (hand-built
    # batches, each step of which may be empty) still steps bare, conservatively charged.
    ds = TensorDataset(torch.randn(64, 3), torch.randn(64))
    model, opt, dl, engine = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, 16))
    x, y = next(iter(dl))
    nn.functional.mse_loss(model(x).squeeze(1), y).backward()
    opt.step()
    after_one = snapshot(model)
    with pytest.raises(InputError, match="step\\(\\) again with no forward and no new batch"):
        opt.step()
    assert engine.ledger.steps == 1
    assert all(torch.equal(t, after_one[k]) for k, t in snapshot(model).items())

    model2, opt2, _, engine2 = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, 16))
    opt2.step()  # never drew from the loader: an empty hand-built batch
    assert engine2.ledger.steps == 1
