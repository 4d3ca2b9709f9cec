"""Model shapes and training-loop habits that must either work exactly or be refused clearly:
tied weights, table subclasses, a second engine, frozen tables, copies, in-place ops on outputs,
gradient accumulation, 0-d ids."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from lazydp import ConfigError, InputError, PrivacyEngine, UnsupportedLayerError
from lazydp.testing import constant_noise, zero_noise
from tests.test_lazy import build, refused_uncharged, snapshot, step
from tests.toy import Toy, dense_params, loader, loss_fn, make_batches, table_params


def _private(model, mode="lazydp", max_grad_norm=1.0, **engine_kwargs):
    engine = PrivacyEngine(**{"seed": 0, **engine_kwargs})
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader(),
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        mode=mode,
    )
    return model, opt, engine


class TiedTables(nn.Module):
    def __init__(self, out_layer: bool) -> None:
        super().__init__()
        self.a = nn.Embedding(10, 4)
        self.b = nn.Linear(4, 10, bias=False) if out_layer else nn.Embedding(10, 4)
        self.b.weight = self.a.weight


@pytest.mark.parametrize("out_layer", [False, True])
@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_tied_weights_are_refused(out_layer, mode):
    with pytest.raises(UnsupportedLayerError, match="share one parameter"):
        _private(TiedTables(out_layer), mode)


class ScaledEmbedding(nn.Embedding):
    """Its own forward: the clipper cannot see which rows it reads (the fallback clips it)."""

    def forward(self, ids):
        return super().forward(ids) * math.sqrt(self.embedding_dim)


def test_a_table_subclass_with_its_own_forward_is_noised_eagerly_under_lazydp():
    probe = torch.tensor([[30, 31], [32, 33]])  # rows no batch reads: only noise moves them
    out = {}
    with constant_noise(0.9):
        for mode in ("dpsgd_f", "lazydp"):
            torch.manual_seed(0)
            model = Toy()
            model.emb = ScaledEmbedding(40, 4, padding_idx=0)
            model, opt, sched, engine = build(mode, model=model)
            assert model.emb.weight not in opt.lazy
            for b in make_batches(5, seed=3):
                step(model, opt, sched, b)
            with torch.no_grad():
                out[mode] = (model.emb(probe), snapshot(model))
    torch.testing.assert_close(out["lazydp"][0], out["dpsgd_f"][0])
    for k, v in out["dpsgd_f"][1].items():
        torch.testing.assert_close(out["lazydp"][1][k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_forward_assigned_on_a_layer_instance_is_refused_not_replaced(mode):
    # Capture installs the class's forward on the instance: a forward the user assigned there
    # (a patched layer) would silently stop running, and detach() would delete it.
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    patched = model[0].forward
    model[0].forward = lambda x: patched(x) * 2
    x = torch.randn(2, 3)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(UnsupportedLayerError, match=r"layer '0' \(Linear\) has a forward assigned"):
        _private(model, mode)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)  # left as it was
    del model[0].forward
    _private(model, mode)  # the plain layer is captured


def test_a_lazy_module_is_refused_until_initialised_and_left_uncaptured():
    # torch raised inside capture (register_hook on an UninitializedParameter) after the
    # earlier layers were captured: the retry after torch's advice (a dummy forward) was then
    # refused as "already captured by another PrivacyEngine", with no engine to detach.
    model = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(4), nn.Linear(4, 1))
    with pytest.raises(ConfigError, match=r"layer '1' \(LazyLinear\) has uninitialized param"):
        _private(model)
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing captured
    with torch.no_grad():
        model(torch.zeros(1, 3))
    _private(model)


def test_a_second_engine_on_a_captured_model_is_refused_until_the_first_detaches():
    model, opt, engine = _private(Toy())
    for b in make_batches(2):
        opt.zero_grad()
        loss_fn(model(*b[:3]), b[3]).backward()
        opt.step()
    with pytest.raises(ConfigError, match="already captured"):
        _private(model)
    engine.detach()  # flushes pending noise and gives the plain model back
    with pytest.warns(UserWarning, match="trained privately before"):  # two in-memory ledgers
        _private(model)


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_the_old_optimizer_refuses_to_step_after_detach(mode):
    """After detach() the layers run uncaptured: a step of the engine's optimizer saw no
    example, so it was taken as an empty batch (charged, noise alone, the gradient dropped)."""
    model, opt, engine = _private(Toy(), mode)
    for b in make_batches(2):
        opt.zero_grad()
        loss_fn(model(*b[:3]), b[3]).backward()
        opt.step()
    engine.detach()
    opt.zero_grad()
    refused_uncharged(model, opt, engine, r"step\(\) after engine.detach\(\)", kept=True)
    assert all(p.grad is not None for p in model.parameters())  # the user's gradient is kept


def test_fine_tuning_a_detached_model_on_another_ledger_warns_and_the_report_says_so(tmp_path):
    """The released model's privacy composes both runs; another ledger counts the second only."""

    def train(ledger, steps=2):
        m, opt, engine = _private(model, seed=None, ledger_path=ledger)
        for b in make_batches(steps):
            opt.zero_grad()
            loss_fn(m(*b[:3]), b[3]).backward()
            opt.step()
        engine.detach()
        return engine

    model = Toy()
    first = tmp_path / "first.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a first run and the same ledger: silent
        train(first)
        again = train(first)
    assert again.ledger.steps == 4  # the same ledger counts both runs
    assert not any("EARLIER" in c for c in again.privacy_report(1e-5).caveats)
    with pytest.warns(UserWarning, match=r"trained privately before .*first\.jsonl.* 4 step"):
        other = train(tmp_path / "other.jsonl")
    assert other.ledger.steps == 2
    assert any(
        c.startswith("EARLIER TRAINING NOT COUNTED") for c in other.privacy_report(1e-5).caveats
    )


@pytest.mark.parametrize(
    "sgd", [{}, {"weight_decay": 0.05}, {"momentum": 0.9}, {"momentum": 0.8, "nesterov": True}]
)
def test_freezing_and_unfreezing_a_table_matches_eager_dp_sgd(sgd):
    """A frozen table neither moves nor decays, and its velocity waits (torch skips a parameter
    without a gradient); the lazy path owes it nothing while frozen."""
    batches = make_batches(9, seed=5)
    out = {}
    with constant_noise(0.9):
        for mode in ("dpsgd_f", "lazydp"):
            model, opt, sched, engine = build(mode, **sgd)
            evals = []
            for i, b in enumerate(batches):
                if i == 3:
                    model.emb.weight.requires_grad_(False)
                if i == 6:
                    with torch.no_grad():
                        evals.append(model(*b[:3]))
                    model.emb.weight.requires_grad_(True)
                step(model, opt, sched, b)
            out[mode] = (evals, snapshot(model))
    torch.testing.assert_close(out["lazydp"][0], out["dpsgd_f"][0], atol=1e-5, rtol=1e-5)
    for k, v in out["dpsgd_f"][1].items():
        torch.testing.assert_close(out["lazydp"][1][k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_frozen_table_does_not_move_and_checkpoints_say_so(tmp_path):
    with constant_noise(0.9):
        model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "l.jsonl")
        step(model, opt, sched, make_batches(1)[0])
        model.emb.weight.requires_grad_(False)
        for b in make_batches(3, seed=2):
            step(model, opt, sched, b)
        frozen = model.emb.weight.detach().clone()
        assert opt.pending_rows() > 0  # the bag still owes noise; the frozen table does not
        assert opt.lazy[model.emb.weight].pending_rows(opt.steps_done) == 0
        engine.save_checkpoint(tmp_path / "ck.pt")
        step(model, opt, sched, make_batches(1, seed=9)[0])
        assert torch.equal(model.emb.weight.detach(), frozen)
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert [t["frozen_at"] for t in saved["lazy"]["tables"]] == [-1, 1]


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_copying_or_pickling_a_private_model_is_refused_until_detached(mode):
    model, opt, engine = _private(Toy(), mode)
    for attempt in (lambda: copy.deepcopy(model), lambda: torch.save(model, io.BytesIO())):
        with pytest.raises(ConfigError, match="cannot be deep-copied or pickled"):
            attempt()
    plain = engine.detach()
    clone = copy.deepcopy(plain)
    for a, b in zip(clone.parameters(), plain.parameters()):
        assert torch.equal(a, b) and a is not b


class InPlace(Toy):
    """Toy with in-place ops on captured layers' outputs."""

    def forward(self, x, bag_ids, emb_ids):
        h = torch.relu_(self.fc1(x))
        h = self.norm(h)
        e1 = self.bag(bag_ids)
        e1 *= 2
        e2 = self.emb(emb_ids).sum(1)
        return self.top(torch.cat([h, e1, e2], 1)).squeeze(1)


class OutOfPlace(Toy):
    def forward(self, x, bag_ids, emb_ids):
        h = self.norm(torch.relu(self.fc1(x)))
        e1 = self.bag(bag_ids) * 2
        e2 = self.emb(emb_ids).sum(1)
        return self.top(torch.cat([h, e1, e2], 1)).squeeze(1)


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_in_place_ops_on_layer_outputs_train_as_their_out_of_place_form(mode):
    out = []
    with zero_noise():
        for cls in (InPlace, OutOfPlace):
            torch.manual_seed(0)
            model, opt, engine = _private(cls(), mode)
            for b in make_batches(4, seed=7):
                opt.zero_grad()
                loss_fn(model(*b[:3]), b[3]).backward()
                opt.step()
            out.append(snapshot(model))
    for k, v in out[1].items():
        torch.testing.assert_close(out[0][k], v, msg=k)


def test_gradient_accumulation_is_refused_and_zero_grad_drops_a_backward():
    model, opt, engine = _private(Toy())
    a, b = make_batches(2, seed=1)
    loss_fn(model(*a[:3]), a[3]).backward()
    with pytest.raises(ConfigError, match="gradient accumulation"):
        model(*b[:3])  # a second micro-batch before step()
    with pytest.raises(ConfigError, match="torch.no_grad"):
        model(*b[:3])  # and a grad-enabled evaluation forward is the same mistake
    assert engine.ledger.steps == 0
    opt.zero_grad()  # drops the unused backward
    model(*a[:3])  # a forward without a backward is simply replaced by the next
    loss_fn(model(*b[:3]), b[3]).backward()
    opt.step()
    assert engine.ledger.steps == 1


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
def test_zero_grad_between_forward_and_backward_keeps_the_forward(mode):
    # `loss = ...; opt.zero_grad(); loss.backward(); opt.step()` (a common loop order) was
    # refused: zero_grad forgot the forward, so the backward looked like one that reached a
    # replaced forward. The step must equal the usual order's, bit for bit.
    batches = make_batches(3, seed=4)
    runs = []
    for late_zero_grad in (False, True):
        torch.manual_seed(0)
        model, opt, engine = _private(Toy(), mode)
        with zero_noise():
            for batch in batches:
                if not late_zero_grad:
                    opt.zero_grad()
                loss = loss_fn(model(*batch[:3]), batch[3])
                if late_zero_grad:
                    opt.zero_grad()
                loss.backward()
                opt.step()
        assert engine.ledger.steps == 3
        runs.append(snapshot(model))
    assert all(torch.equal(t, runs[0][k]) for k, t in runs[1].items())


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_step_after_an_unused_forward_names_what_drops_it(mode):
    # Since zero_grad keeps a forward no backward reached (for `loss = ...; opt.zero_grad();
    # loss.backward()`), the refusal of a step after a grad-enabled evaluation forward must not
    # advise zero_grad: the loop below did call it and was refused again. What it says works:
    # the evaluation under torch.no_grad() lets the same (empty) step through.
    batches = make_batches(2, seed=4)
    torch.manual_seed(0)
    model, opt, engine = _private(Toy(), mode)
    with zero_noise():
        opt.zero_grad()
        loss_fn(model(*batches[0][:3]), batches[0][3]).backward()
        opt.step()
        model.eval()
        model(*batches[1][:3])  # grad enabled, no backward
        model.train()
        opt.zero_grad()
        with pytest.raises(InputError, match="without loss.backward") as info:
            opt.step()
        assert "zero_grad() to drop" not in str(info.value)
        assert "torch.no_grad()" in str(info.value)
        model(*batches[1][:3])  # replaced by the next training forward ...
        opt.zero_grad()
        model.eval()
        with torch.no_grad():  # ... and an evaluation under no_grad records nothing
            model(*batches[1][:3])
        model.train()
        loss_fn(model(*batches[1][:3]), batches[1][3]).backward()
        opt.step()
    assert engine.ledger.steps == 2


class LossMethod(nn.Module):
    """Lightning/HF style: the loss comes from a method that calls the layers, not forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 4)
        self.fc = nn.Linear(4, 1)

    def compute_loss(self, ids, y):
        return nn.functional.mse_loss(self.fc(self.emb(ids)).squeeze(1), y)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_f", "lazydp"])
def test_gradient_accumulation_is_refused_when_the_loss_does_not_come_from_forward(mode):
    # The refusal lived in the root module's forward pre-hook only: two micro-batches through
    # compute_loss were clipped as one batch (rows of different batches as one example) and
    # charged as one step.
    model, opt, engine = _private(LossMethod(), mode)
    batches = [(torch.randint(0, 40, (8,), generator=g), torch.randn(8, generator=g))
               for g in [torch.Generator().manual_seed(i) for i in range(3)]]  # fmt: skip
    for ids, y in batches[:2]:  # one step per batch: trains as usual
        opt.zero_grad()
        model.compute_loss(ids, y).backward()
        opt.step()
    assert engine.ledger.steps == 2
    before = snapshot(model)
    model.compute_loss(*batches[0]).backward()
    model.compute_loss(*batches[1]).item()  # logged, not backpropagated: harmless
    model.compute_loss(*batches[1]).backward()  # a second micro-batch's gradient
    with pytest.raises(ConfigError, match="gradient accumulation"):
        opt.step()
    opt.zero_grad()  # drops the unused backward: the loop goes on
    assert engine.ledger.steps == 2
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())
    model.compute_loss(*batches[2]).backward()
    opt.step()
    assert engine.ledger.steps == 3


def test_dpsgd_r_refuses_a_loss_that_does_not_come_from_forward():
    # Its reweighted second pass re-runs model(...): it used to be skipped without a word, so
    # the run was dpsgd_b under dpsgd_r's name.
    model, opt, engine = _private(LossMethod(), "dpsgd_r")
    before = snapshot(model)
    model.compute_loss(torch.tensor([1, 2, 3]), torch.randn(3)).backward()
    with pytest.raises(ConfigError, match="did not come through model"):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())


def test_zero_dim_ids_are_refused_in_training_only():
    model, opt, engine = _private(nn.Sequential(nn.Embedding(10, 3)))
    with pytest.raises(InputError, match="0-d id tensor"):
        model(torch.tensor(3))
    with torch.no_grad():
        assert model(torch.tensor(3)).shape == (3,)


def test_a_refused_model_is_left_untouched_and_can_be_fixed_and_retried():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(UnsupportedLayerError):
        _private(model, "dpsgd_f")
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing captured
    model[1] = nn.LayerNorm(4)
    _private(model, "dpsgd_f")  # not mistaken for a model another engine holds


def test_an_engine_whose_make_private_refused_the_model_can_be_used_again():
    # The capture's own refusals (a layer it cannot capture) left the engine holding the
    # refused model: the corrected call was told the engine "already made a model private".
    engine = PrivacyEngine(seed=0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(1))

    def make_private(m):
        return engine.make_private(
            module=m,
            optimizer=torch.optim.SGD(m.parameters(), lr=0.5),
            data_loader=loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            mode="dpsgd_f",
        )

    with pytest.raises(ConfigError, match="uninitialized parameters"):
        make_private(model)
    with torch.no_grad():
        model(torch.randn(2, 3))  # initialises the lazy layer, as the message says
    model, opt, _ = make_private(model)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert engine.ledger.steps == 1


class TiedProjection(nn.Module):
    """The output projection reuses the table's weight in the parent's forward, not a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids):
        return (self.emb(ids) @ self.emb.weight.T).sum(1)


class Penalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)

    def forward(self, x):
        return self.a(x).squeeze(1)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
def test_a_parameter_used_outside_its_layer_is_refused_at_step(mode):
    # That part of the gradient never passes the clipper: dropped in three modes, unclipped in
    # dpsgd_r (an audit measured 1.11x C for one example). Refused before anything changes.
    model, opt, engine = _private(TiedProjection(), mode)
    before = model.emb.weight.detach().clone()
    opt.zero_grad()
    model(torch.tensor([1, 2, 3])).pow(2).mean().backward()
    with pytest.raises(ConfigError, match=r"\['emb.weight'\] got a gradient from outside"):
        opt.step()
    assert engine.ledger.steps == 0 and torch.equal(model.emb.weight.detach(), before)


def test_a_penalty_on_the_weights_is_refused_and_zero_grad_forgets_it():
    model, opt, engine = _private(Penalised(), "dpsgd_f")
    x = torch.randn(4, 3)
    opt.zero_grad()
    (model(x).pow(2).mean() + 5 * model.a.weight.pow(2).sum()).backward()
    with pytest.raises(ConfigError, match="weight_decay"):
        opt.step()
    opt.zero_grad()  # the user fixes the loss: training goes on
    model(x).pow(2).mean().backward()
    opt.step()
    assert engine.ledger.steps == 1


def test_two_forwards_before_one_backward_are_refused_not_half_dropped():
    # Two views through the model, one loss: the second forward replaced the first's records,
    # whose gradient was silently dropped.
    model, opt, engine = _private(nn.Linear(3, 1), "dpsgd_f")
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    (model(x1).sum() + model(x2).sum()).backward()
    with pytest.raises(ConfigError, match="replaced"):
        opt.step()
    assert engine.ledger.steps == 0
    opt.zero_grad()  # dropped on purpose: training goes on
    model(x1).sum().backward()
    opt.step()
    assert engine.ledger.steps == 1


class PaddedModel(nn.Module):
    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        self.table, self.out = table, nn.Linear(3, 1)

    def forward(self, ids):
        h = self.table(ids)
        return self.out(h if h.dim() == 2 else h.sum(1)).squeeze(1)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_f", "dpsgd_r", "lazydp"])
@pytest.mark.parametrize(
    "table", ["embedding", "bag", "subclass"], ids=["embedding", "bag", "subclass"]
)
def test_the_padding_row_stays_fixed_on_every_noise_path(mode, table):
    """torch never updates a padding_idx row (its gradient is zero in every example), so its
    sensitivity is 0 and DP-SGD owes it no noise. Tables on plain SGD kept it fixed; a table on
    another optimizer (or one the fallback clipper handles) got dense noise there too, and the
    pad drifted (0.25 in one Adam step here)."""
    torch.manual_seed(0)
    make = {
        "embedding": lambda: nn.Embedding(10, 3, padding_idx=2),
        "bag": lambda: nn.EmbeddingBag(10, 3, mode="sum", padding_idx=2),
        "subclass": lambda: ScaledEmbedding(10, 3, padding_idx=2),
    }[table]
    model = PaddedModel(make())
    pad = model.table.weight[2].detach().clone()
    if mode == "lazydp":  # Adam on the dense layer; the table gets plain SGD (lazy or eager)
        opt = [
            torch.optim.Adam(model.out.parameters(), 0.1),
            torch.optim.SGD(model.table.parameters(), 0.1),
        ]
    else:
        opt = [torch.optim.Adam(model.parameters(), lr=0.1)]
    ids = torch.randint(0, 10, (64, 4))
    ids[:, 0] = 2  # every example reads the pad too
    data = torch.utils.data.TensorDataset(ids, torch.randn(64))
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=torch.utils.data.DataLoader(data, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        mode=mode,
    )
    for x, y in dl:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    state = model.state_dict()  # flushed: a lazy table's pending noise is applied
    # A subclass with its own forward goes to the fallback clipper, which cannot rule out a
    # gradient on the padding row: it keeps its noise (safe), so its pad moves.
    assert bool((state["table.weight"][2] == pad).all()) == (table != "subclass")
    assert not bool((state["table.weight"][3] == 0).all())  # the other rows did train


class _WeightedBagTwice(nn.Module):
    """One EmbeddingBag called twice in a forward, its per_sample_weights computed by a layer
    (so they require grad: the bag's backward needs the rows it read)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(5, 2, mode="sum")
        self.gate = nn.Linear(1, 1)

    def forward(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        psw = torch.sigmoid(self.gate(w.unsqueeze(-1)).squeeze(-1))
        return self.bag(ids, per_sample_weights=psw) + self.bag(ids.flip(1), per_sample_weights=psw)


def test_a_bag_with_trainable_per_sample_weights_called_twice_equals_eager():
    # Read from the table, the first call's backward found the table written by the second
    # call's catch-up (torch: "modified by an inplace operation"); it reads its block now.
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 5, (4, 3), generator=g), torch.rand(4, 3, generator=g))]
    batches *= 3
    finals = {}
    for mode in ("dpsgd_f", "lazydp"):
        torch.manual_seed(0)
        model, opt, _ = _private(_WeightedBagTwice(), mode, max_grad_norm=0.5)
        with constant_noise(0.37):
            for ids, w in batches:
                opt.zero_grad()
                model(ids, w).pow(2).sum(1).mean().backward()
                opt.step()
            finals[mode] = snapshot(model)
    for k, t in finals["dpsgd_f"].items():
        torch.testing.assert_close(finals["lazydp"][k], t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on", ["private", "original"])
def test_a_parameter_group_added_after_make_private_is_refused(on):
    # A layer frozen and left out of the optimizer at make_private, unfrozen and added later:
    # the private optimizer's add_param_group dropped the group without a word (the layer
    # never trained), and one added to the original optimizer got no clipped gradient.
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    original = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine(seed=0)
    model, opt, _ = engine.make_private(
        module=model, optimizer=original, data_loader=loader(), noise_multiplier=1.0,
        max_grad_norm=1.0, mode="dpsgd_f",
    )  # fmt: skip
    model[0].requires_grad_(True)
    group = {"params": list(model[0].parameters())}
    if on == "private":
        with pytest.raises(ConfigError, match="parameter groups cannot change"):
            opt.add_param_group(group)
        return
    original.add_param_group(group)
    before = snapshot(model)
    nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 1)).backward()
    with pytest.raises(ConfigError, match="list 4 parameters, not 2"):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("swap", "param group 0 no longer holds the parameters"),
        ("pop_and_add_back", "param group 0 no longer holds the parameters"),
        ("pop", "list 7 parameters, not 8"),
    ],
)
def test_a_table_moved_to_another_parameter_group_is_refused(change, match):
    # Two tables in groups of different lr: with the parameter count kept, lazydp went on
    # reading each table's lr (and noise) from the group it had at make_private, so the moved
    # table trained at the other group's lr without a word (dpsgd_f used the new one). A group
    # removed failed with an IndexError (the tables' lr was read before the groups' check).
    torch.manual_seed(0)
    model = Toy()
    dense = torch.optim.Adam(dense_params(model), lr=0.01)
    tables = torch.optim.SGD(
        [{"params": [model.bag.weight], "lr": 0.5}, {"params": [model.emb.weight], "lr": 0.1}]
    )
    engine = PrivacyEngine(seed=0)
    model, opt, _ = engine.make_private(
        module=model, optimizer=[dense, tables], data_loader=loader(), noise_multiplier=1.0,
        max_grad_norm=1.0, mode="lazydp",
    )  # fmt: skip
    x, bag, emb, y = make_batches(1, seed=3)[0]
    if change == "swap":
        first, second = tables.param_groups
        first["params"], second["params"] = second["params"], first["params"]
    elif change == "pop_and_add_back":
        tables.add_param_group(tables.param_groups.pop(0))
    else:
        tables.param_groups.pop()
    before = snapshot(model)
    opt.zero_grad()
    loss_fn(model(x, bag, emb), y).backward()
    with pytest.raises(ConfigError, match=match):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())


def test_the_sgd_mode_optimizer_adds_a_parameter_group_to_the_optimizer_it_wraps():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 1))
    first = torch.optim.SGD(model[1].parameters(), lr=0.5)
    _, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=first, data_loader=loader(), noise_multiplier=1.0,
        max_grad_norm=1.0, mode="sgd",
    )  # fmt: skip
    opt.add_param_group({"params": list(model[0].parameters())})
    assert len(first.param_groups) == 2
    before = model[0].weight.detach().clone()
    model(torch.randn(8, 6)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("mode", ["sgd", "lazydp"])
def test_hooks_registered_on_the_private_optimizer_run(mode):
    # The private optimizer accepted torch's register_step_pre_hook / post_hook and the
    # state_dict hooks, and never called them (torch installs them in Optimizer.__init__).
    torch.manual_seed(0)
    model = Toy()
    _, opt, _ = PrivacyEngine(seed=0).make_private(
        module=model, data_loader=loader(), noise_multiplier=1.0, max_grad_norm=1.0, mode=mode,
        optimizer=[torch.optim.Adam(dense_params(model)), torch.optim.SGD(table_params(model))],
    )  # fmt: skip
    calls: list[str] = []
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(model.top.weight.clone()))
    opt.register_state_dict_post_hook(lambda o, state: {**state, "mine": 1})
    opt.register_load_state_dict_pre_hook(lambda o, state: calls.append(state.pop("mine")))
    x, bag, emb, y = make_batches(1, seed=3)[0]
    opt.zero_grad()
    loss_fn(model(x, bag, emb), y).backward()
    opt.step()
    assert calls == ["pre"]
    assert len(seen) == 1 and torch.equal(seen[0], model.top.weight)  # after the update
    state = opt.state_dict()
    assert state["mine"] == 1
    opt.load_state_dict(state)
    assert calls == ["pre", 1]


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 1)
        self.reentrant = reentrant

    def block(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))

    def forward(self, x):
        if self.reentrant is None:
            return self.c(self.block(x)).squeeze(1)
        from torch.utils.checkpoint import checkpoint

        return self.c(checkpoint(self.block, x, use_reentrant=self.reentrant)).squeeze(1)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_f", "lazydp"])
def test_activation_checkpointing_trains_as_the_same_model_without_it(mode):
    # The recompute runs the block's layers inside the backward, after later layers' outputs
    # got their gradients: it was refused as gradient accumulation for a while.
    x, y = torch.randn(3, 16, 8), torch.randn(3, 16)
    out = []
    for reentrant in (None, False, True):
        torch.manual_seed(0)
        model, opt, engine = _private(Checkpointed(reentrant), mode)
        with zero_noise():
            for xb, yb in zip(x, y):
                opt.zero_grad()
                nn.functional.mse_loss(model(xb.requires_grad_(reentrant is True)), yb).backward()
                opt.step()
        assert engine.ledger.steps == 3
        out.append(snapshot(model))
    torch.manual_seed(0)
    assert not torch.equal(out[0]["a.weight"], Checkpointed(None).a.weight)  # it trained
    for other in out[1:]:
        for k, v in out[0].items():
            torch.testing.assert_close(other[k], v, msg=k)


class RunningMean(nn.Module):
    """A custom normaliser: subtracts a running mean of its inputs, kept in a buffer."""

    def __init__(self, reassign: bool, train_only: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.register_buffer("mean", torch.zeros(3))
        self.reassign, self.train_only = reassign, train_only

    def forward(self, x):
        if torch.is_grad_enabled() or not self.train_only:
            batch_mean = x.detach().mean(0)
            if self.reassign:
                self.mean = 0.9 * self.mean + 0.1 * batch_mean
            else:
                self.mean.mul_(0.9).add_(batch_mean, alpha=0.1)
        return self.fc(x - self.mean).squeeze(1)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
@pytest.mark.parametrize("reassign", [False, True])
def test_a_buffer_updated_from_the_training_batch_is_refused(mode, reassign):
    # Its values (means of the training examples) left in state_dict() and steered evaluation
    # with neither clipping nor noise; nothing refused it.
    model, opt, engine = _private(RunningMean(reassign), mode)
    before = model.fc.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ConfigError, match=r"buffer\(s\) \['mean'\] changed"):
        opt.step()
    assert engine.ledger.steps == 0 and torch.equal(model.fc.weight.detach(), before)


class HiddenWrite(nn.Module):
    """A running mean of the training inputs, written in ways that leave no version bump (or in
    a slot that did not exist when make_private looked)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.how = how
        if how != "registered_in_forward":
            self.register_buffer("mean", torch.zeros(3))

    def forward(self, x):
        batch_mean = x.detach().mean(0)
        if self.how == "data_in_place":  # the classic EMA idiom (VQ-VAE codebooks, ...)
            self.mean.data.mul_(0.9).add_(batch_mean, alpha=0.1)
        elif self.how == "data_assigned":
            self.mean.data = 0.9 * self.mean + 0.1 * batch_mean
        elif self.how == "numpy":
            self.mean.numpy()[:] = batch_mean.numpy()
        elif self.how == "numpy_nan":  # NaN != NaN: the value check must still see a write
            self.mean.numpy()[:] = batch_mean.numpy()
            self.mean.numpy()[0] = float("nan")
        elif self.how == "registered_in_forward":  # created from the first batch
            self.register_buffer("mean", batch_mean.clone())
        return self.fc(x - self.mean).squeeze(1)


@pytest.mark.parametrize("mode", ["dpsgd_r", "lazydp"])
@pytest.mark.parametrize(
    "how", ["data_in_place", "data_assigned", "numpy", "numpy_nan", "registered_in_forward"]
)
def test_a_buffer_written_without_a_version_bump_or_added_later_is_refused(mode, how):
    # Neither the tensor nor its version counter changed (or the slot was new): the batch's
    # mean left in state_dict() with neither clipping nor noise.
    model, opt, engine = _private(HiddenWrite(how), mode)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ConfigError, match=r"buffer\(s\) \['mean'\] changed"):
        opt.step()
    assert engine.ledger.steps == 0


def test_a_submodule_with_a_buffer_added_after_make_private_is_checked_too():
    model, opt, engine = _private(RunningMean(reassign=False), "dpsgd_f")
    stats = RunningMean(reassign=False)
    stats.fc.requires_grad_(False)  # only its buffer matters
    model.stats = stats
    model.forward = lambda x: model.stats(x) + model.fc(x - model.mean).squeeze(1)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ConfigError, match=r"buffer\(s\) \['stats.mean'\] changed"):
        opt.step()
    assert engine.ledger.steps == 0


def test_a_quantization_observer_fed_the_training_batch_is_refused():
    # QAT's fused observer writes its min/max and scale in place inside one torch op, without a
    # version bump: the training activations' range was released unnoised.
    from torch.ao.quantization import FusedMovingAvgObsFakeQuantize

    model = nn.Sequential(FusedMovingAvgObsFakeQuantize(), nn.Linear(3, 1))
    model, opt, engine = _private(model, "dpsgd_f")
    model(5 * torch.randn(4, 3)).sum().backward()
    with pytest.raises(ConfigError, match=r"0\.activation_post_process\.min_val"):
        opt.step()
    assert engine.ledger.steps == 0


class EvalCounter(nn.Module):
    """Counts evaluation calls in a buffer; training forwards leave it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.register_buffer("evals", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.evals += 1
        return self.fc(x).squeeze(1)


def test_buffers_written_outside_the_training_pass_are_not_refused():
    # An evaluation between steps that writes a buffer, and a buffer replaced between steps
    # (as model.to() / model.double() do), are not the training pass: no refusal.
    model, opt, engine = _private(EvalCounter(), "dpsgd_f")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        with torch.no_grad():
            model(torch.randn(4, 3))
        model.evals = model.evals.clone()
    assert engine.ledger.steps == 3 and int(model.evals) == 3


def test_a_buffer_too_large_to_copy_is_still_checked_by_version(monkeypatch):
    # Above buffer_guard._COPY_MAX elements no copy is kept (a large constant would cost a copy per
    # step): an in-place write still bumps its version and is refused; an untouched one passes.
    from lazydp import buffer_guard

    monkeypatch.setattr(buffer_guard, "_COPY_MAX", 2)
    model, opt, engine = _private(EvalCounter(), "dpsgd_f")
    model.register_buffer("big", torch.zeros(5))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # untouched: passes
    model(torch.randn(4, 3)).sum().backward()
    model.big.add_(1.0)
    with pytest.raises(ConfigError, match=r"\['big'\] changed"):
        opt.step()
    assert engine.ledger.steps == 1


def test_a_buffer_too_large_to_copy_replaced_by_a_new_tensor_is_refused(monkeypatch):
    # Without a copy, only the tensor's identity tells a replacement apart: a fresh tensor has
    # version 0, like an untouched buffer that was never written.
    from lazydp import buffer_guard

    monkeypatch.setattr(buffer_guard, "_COPY_MAX", 2)
    model, opt, engine = _private(EvalCounter(), "dpsgd_f")
    model.register_buffer("big", torch.zeros(5))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model(torch.randn(4, 3)).sum().backward()
    model.big = torch.ones(5)  # e.g. a statistic of the batch, assigned
    with pytest.raises(ConfigError, match=r"\['big'\] changed"):
        opt.step()
    assert engine.ledger.steps == 1


def test_a_second_backward_through_a_retained_graph_is_refused_with_its_cause():
    # After zero_grad() (or a step) a backward through the old graph reached forgotten records
    # and was refused as if a later training forward had replaced them.
    model, opt, engine = _private(nn.Linear(3, 1), "dpsgd_f")
    loss = model(torch.randn(4, 3)).sum()
    loss.backward(retain_graph=True)
    opt.zero_grad()
    loss.backward(retain_graph=True)
    with pytest.raises(ConfigError, match=r"zero_grad\(\) dropped"):
        opt.step()
    opt.zero_grad()
    loss = model(torch.randn(4, 3)).sum()
    loss.backward(retain_graph=True)
    opt.step()
    loss.backward()
    with pytest.raises(ConfigError, match=r"an earlier optimizer.step\(\) already used"):
        opt.step()
    assert engine.ledger.steps == 1


def test_a_stale_backward_combined_with_a_new_forward_is_refused_not_dropped():
    # Each clear() used to start a new lost list, so records forgotten by an earlier clear
    # appended to a list nothing checked: the old graph's part of the gradient was dropped
    # and the step charged (review of today's commits).
    model, opt, engine = _private(nn.Linear(3, 1), "dpsgd_f")
    old = model(torch.randn(4, 3)).sum()
    old.backward(retain_graph=True)
    opt.step()
    opt.zero_grad()
    new = model(torch.randn(4, 3)).sum()
    (old + new).backward()
    with pytest.raises(ConfigError, match=r"an earlier optimizer.step\(\) already used"):
        opt.step()
    assert engine.ledger.steps == 1
    opt.zero_grad()  # drops it: training goes on
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert engine.ledger.steps == 2


def _input_grad_steps(mode: str, how: str) -> tuple[dict[str, torch.Tensor], int]:
    """Three zero-noise steps on Toy, with torch.autograd.grad on an input between forward and
    backward (``how``: "plain" none, "logged" the same forward's input gradient, "adversarial"
    an FGSM-style example trained on instead of the clean batch, "reference" that example
    made with a plain copy of the model)."""
    torch.manual_seed(0)
    model, opt, engine = _private(Toy(), mode)
    with zero_noise():
        for x, bag, emb, y in make_batches(3):
            opt.zero_grad()
            x = x.clone().requires_grad_(how != "plain")
            loss = loss_fn(model(x, bag, emb), y)
            if how in ("logged", "adversarial"):
                (gx,) = torch.autograd.grad(loss, x, retain_graph=how == "logged")
            if how == "reference":  # the same example, from a plain copy of the model
                plain = Toy()
                plain.load_state_dict(model.state_dict())
                (gx,) = torch.autograd.grad(loss_fn(plain(x, bag, emb), y), x)
            if how in ("adversarial", "reference"):
                x_adv = (x + 0.1 * gx.sign()).detach()
                loss = loss_fn(model(x_adv, bag, emb), y)
            loss.backward()
            opt.step()
        return snapshot(model), engine.ledger.steps


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
def test_an_input_gradient_from_autograd_grad_is_not_trained_on(mode):
    # torch.autograd.grad(loss, x) ran through the layers' taps, which recorded its output
    # gradients as if it were loss.backward(): the backward after it doubled every example's
    # gradient, and an adversarial example's forward was refused as gradient accumulation.
    plain, steps = _input_grad_steps(mode, "plain")
    logged, logged_steps = _input_grad_steps(mode, "logged")
    assert steps == logged_steps == 3
    for k, v in plain.items():
        torch.testing.assert_close(logged[k], v, msg=k)
    adversarial, adversarial_steps = _input_grad_steps(mode, "adversarial")
    reference, _ = _input_grad_steps(mode, "reference")
    assert adversarial_steps == 3
    assert not torch.equal(adversarial["top.weight"], plain["top.weight"])  # another batch
    for k, v in reference.items():
        torch.testing.assert_close(adversarial[k], v, msg=k)
    # autograd.grad alone leaves no gradient to step on, as it leaves every .grad in torch.
    model, opt, engine = _private(Toy(), mode)
    x, bag, emb, y = make_batches(1)[0]
    x.requires_grad_()
    torch.autograd.grad(loss_fn(model(x, bag, emb), y), x)
    with pytest.raises(InputError, match="without loss.backward"):
        opt.step()
    assert engine.ledger.steps == 0


@pytest.mark.parametrize("change", ["new_parameter", "weight_norm", "parametrization"])
@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_layer_whose_parameters_are_replaced_after_make_private_is_refused(change, mode):
    # A new nn.Parameter was in no optimizer: it never trained while the old one got noise
    # alone, and a parametrization applied after make_private failed in the step with a
    # KeyError (weight_norm) or was called a use outside the layer.
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    model, opt, engine = _private(Toy(), mode)
    old = model.top.weight
    if change == "new_parameter":
        model.top.weight = nn.Parameter(old.detach().clone())
    elif change == "weight_norm":
        weight_norm(model.top)
    else:
        parametrize.register_parametrization(model.fc1, "weight", nn.Identity())
    refused_uncharged(model, opt, engine, "no longer holds the parameters", kept=True)
    if change == "new_parameter":  # the old parameter back: training goes on
        x, bag, emb, y = make_batches(1)[0]
        model.top.weight = old
        opt.zero_grad()
        loss_fn(model(x, bag, emb), y).backward()
        opt.step()
        assert engine.ledger.steps == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace", "script_layer"])
def test_a_torchscript_model_is_refused_at_make_private_and_left_untouched(how):
    # A traced model failed with a TypeError from inside torch (BufferDict), a scripted one
    # was refused as a forward assigned on a layer instance.
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    expected = model(x)
    if how == "script":
        model = torch.jit.script(model)
    elif how == "trace":
        model = torch.jit.trace(model, x)
    else:
        model[0] = torch.jit.script(model[0])
    with pytest.raises(UnsupportedLayerError, match="TorchScript module"):
        _private(model, "dpsgd_f")
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("when", ["before", "after", "post_accumulate"])
@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_gradient_hook_on_a_parameter_is_refused_not_ignored(when, mode):
    # lazydp forms each layer's clipped sum itself: autograd never computes the parameters'
    # gradients, so a hook on one (a gradient mask for partial fine-tuning) never ran and the
    # masked rows trained on, without a word.
    model = Toy()
    if when == "before":
        model.fc1.weight.register_hook(lambda g: g * 0)
        with pytest.raises(ConfigError, match=r"\['weight'\] of layer 'fc1' carry gradient hooks"):
            _private(model, mode)
        assert "forward" not in model.fc1.__dict__  # nothing captured
        return
    model, opt, engine = _private(model, mode)
    if when == "after":
        model.top.weight.register_hook(lambda g: g * 0)
    else:
        model.top.bias.register_post_accumulate_grad_hook(lambda p: None)
    refused_uncharged(model, opt, engine, "carry gradient hooks.*Nothing was changed", kept=True)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("how", ["compile_before", "compile_after", "trace_after"])
def test_a_compiled_or_traced_model_is_refused_clearly_before_any_charge(how):
    # torch.compile before or after make_private was refused with "got a gradient from outside
    # their own layer" (naming the wrong layer); torch.jit.trace after it raised torch's own
    # "Cannot insert a Tensor that requires grad as a constant".
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    if how == "compile_before":
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(UnsupportedLayerError, match="the model was compiled"):
            _private(compiled, "dpsgd_f")
        assert "forward" not in model[0].__dict__  # nothing captured
        return
    model, opt, engine = _private(model, "dpsgd_f")
    with pytest.raises(UnsupportedLayerError, match="is being compiled.*Nothing was changed"):
        if how == "compile_after":
            torch.compile(model, backend="eager")(x).sum().backward()
        else:
            torch.jit.trace(model, x)
    model(x).sum().backward()  # the eager model still trains
    opt.step()
    assert engine.ledger.steps == 1


class _Doubled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("part", ["frozen_backbone", "activation"])
def test_a_compiled_submodule_without_trainable_parameters_trains_as_the_eager_one(part):
    # Nothing of it is captured (as a frozen parametrized backbone): refusing it at
    # make_private, as a compiled model, stopped a model that trained exactly.
    def run(compiled: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        if part == "frozen_backbone":
            inner: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).requires_grad_(False)
            model = nn.Sequential(inner, nn.Linear(4, 1))
        else:
            inner = _Doubled()
            model = nn.Sequential(nn.Linear(3, 4), inner, nn.Linear(4, 1))
        if compiled:
            model[0 if part == "frozen_backbone" else 1] = torch.compile(inner, backend="eager")
        model, opt, engine = _private(model, "dpsgd_f")
        torch.manual_seed(1)
        with zero_noise():
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(6, 3)).pow(2).sum().backward()
                opt.step()
        assert engine.ledger.steps == 2
        return {
            k: v.detach().clone() for k, v in model.state_dict().items() if "_orig_mod" not in k
        }

    eager = run(False)
    for k, v in run(True).items():
        torch.testing.assert_close(v, eager[k], msg=k)


def test_backward_with_inputs_is_named_in_the_refusal_it_gets():
    # backward(inputs=params) never reaches the captured layers (they run on detached
    # parameters): the step's refusal said only "a forward without loss.backward()".
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model, opt, engine = _private(model, "dpsgd_f")
    model(torch.randn(5, 3)).sum().backward(inputs=list(model.parameters()))
    with pytest.raises(InputError, match=r"backward\(inputs=...\)"):
        opt.step()
    assert engine.ledger.steps == 0


@pytest.mark.parametrize("part", ["wrapped", "inner"])
def test_earlier_training_is_flagged_for_a_model_inside_a_new_one_and_for_a_part(part):
    """Fine-tuning a detached model under a new head (or one of its layers alone) on another
    ledger releases the first run's training too: warned and flagged as for the model itself."""
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randn(40, 1))

    def train(model: nn.Module) -> PrivacyEngine:
        engine = PrivacyEngine()
        m, opt, dl = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(data, batch_size=10),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
        x, y = next(iter(dl))
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
        engine.detach()
        return engine

    base = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    train(base)
    later = nn.Sequential(base, nn.Linear(1, 1)) if part == "wrapped" else base[0]
    with pytest.warns(UserWarning, match="trained privately before .* 1 step"):
        other = train(later)
    assert any(c.startswith("EARLIER TRAINING") for c in other.privacy_report(1e-5).caveats)
