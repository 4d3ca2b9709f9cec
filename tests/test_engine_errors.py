"""Bad input gets a clear error and changes nothing (no parameter, no ledger entry)."""

from __future__ import annotations

import math
import struct
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lazydp import (
    ConfigError,
    InputError,
    PrivacyEngine,
    PrivacyError,
    UnsupportedLayerError,
    UnsupportedOptimizerError,
)
from tests.toy import Toy, loader, loss_fn, make_batches


def private(mode="lazydp", model=None, **kw):
    model = model or Toy()
    engine = PrivacyEngine(seed=0, ledger_path=kw.pop("ledger_path", None))
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, mode=mode, data_loader=loader())
    args.update(kw)
    m, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **args
    )
    return m, opt, dl, engine


def snapshot(model):
    return {k: t.detach().clone() for k, t in model.named_parameters()}


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_out_of_range_id_is_refused_before_any_change(mode):
    model, opt, _, engine = private(mode)
    x, bag, emb, y = make_batches(1)[0]
    bag[0, 0] = 40  # the table has 40 rows
    before = snapshot(model)
    with pytest.raises(InputError, match="40"):
        model(x, bag, emb)
    assert engine.ledger.steps == 0
    for k, t in snapshot(model).items():
        assert torch.equal(t, before[k]), k


def test_negative_and_float_ids_are_refused():
    model, *_ = private()
    x, bag, emb, _ = make_batches(1)[0]
    with pytest.raises(InputError):
        model(x, bag, emb - 5)
    with pytest.raises(InputError):
        model(x, bag.float(), emb)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_f", "lazydp"])
def test_nan_features_are_refused_at_step_and_nothing_is_charged(mode):
    model, opt, _, engine = private(mode)
    x, bag, emb, y = make_batches(1)[0]
    x[0, 0] = float("nan")
    before = snapshot(model)
    loss_fn(model(x, bag, emb), y).backward()
    with pytest.raises(InputError, match="NaN"):
        opt.step()
    assert engine.ledger.steps == 0
    for k, t in snapshot(model).items():
        assert torch.equal(t, before[k]), k


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_diverged_parameters_are_named_instead_of_the_batch(mode):
    # A huge max_grad_norm (or lr) blew the weights up in one step; the next step's NaN was
    # blamed on "the batch's features".
    model, opt, _, engine = private(mode)
    x, bag, emb, y = make_batches(1)[0]
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    loss_fn(model(x, bag, emb), y).backward()
    with pytest.raises(InputError, match=r"'fc1.weight'\] already hold NaN or Inf.*diverged"):
        opt.step()
    assert engine.ledger.steps == 0


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_squared_norm_that_overflows_is_named_not_blamed_on_nan_features(mode):
    # Every tensor is finite, but ||a||^2 ||g||^2 of a 1e20-sized input overflows float32.
    model = nn.Linear(4, 2)
    m, opt, _, engine = private(mode, model=model)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    ((m(torch.full((2, 4), 1e20)) - 1) ** 2).sum().backward()
    with pytest.raises(InputError, match="overflowed.*float64"):
        opt.step()
    assert engine.ledger.steps == 0


def test_batchnorm_and_max_bag_are_refused_with_alternatives():
    with pytest.raises(UnsupportedLayerError, match="GroupNorm|LayerNorm"):
        private(model=nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(UnsupportedLayerError, match="sum"):
        private(model=nn.EmbeddingBag(10, 3, mode="max"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(mode="fast"), "mode"),
        (dict(sampler="random"), "sampler"),
    ],
)
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ConfigError, match=match):
        private(**kw)


def test_optimizer_with_foreign_parameters_is_refused():
    model = Toy()
    other = nn.Linear(2, 2)
    with pytest.raises(UnsupportedOptimizerError, match="not in the model"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1),
            data_loader=loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
@pytest.mark.parametrize("layout", ["two optimizers", "one group twice"])
def test_a_parameter_listed_twice_is_refused(mode, layout):
    # Each listing would add the clipped sum once more, with noise for one update: the table of
    # a lazydp model got 2G and one draw (sigma/2 in effect), dpsgd_f 2G and two (sigma/sqrt 2).
    model = Toy()
    with warnings.catch_warnings():  # torch warns (only) about a duplicate inside one group
        warnings.simplefilter("ignore")
        if layout == "two optimizers":
            opts = [
                torch.optim.SGD(model.parameters(), lr=0.1),
                torch.optim.SGD(model.emb.parameters(), lr=0.1),
            ]
        else:
            opts = [torch.optim.SGD([*model.parameters(), model.emb.weight], lr=0.1)]
    engine = PrivacyEngine(seed=0)
    args = dict(data_loader=loader(), noise_multiplier=1.0, max_grad_norm=1.0, mode=mode)
    with pytest.raises(ConfigError, match="listed twice"):
        engine.make_private(module=model, optimizer=opts, **args)
    # The refused call gave the model back: the corrected one is not told it is captured.
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **args)


def test_a_refused_optimizer_leaves_the_model_free_for_the_corrected_call():
    model = Toy()
    args = dict(data_loader=loader(), noise_multiplier=1.0, max_grad_norm=1.0, mode="lazydp")
    with pytest.raises(UnsupportedOptimizerError, match="exact"):
        PrivacyEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.Adam(model.parameters()), **args
        )
    _, opt, _ = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **args
    )
    assert opt.lazy  # the tables are lazily noised in the second engine


def test_an_optimizer_state_of_another_layout_is_refused_and_loads_nothing():
    # With two optimizers, a saved list of one loaded into the first only (zip) and a plain
    # optimizer's state_dict failed with KeyError: 'optimizers'.
    model = Toy()
    dense = torch.optim.Adam([model.fc1.weight, model.fc1.bias], lr=0.01)
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc1.")]
    tables = torch.optim.SGD(rest, lr=0.5)
    _, opt, _ = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=[dense, tables], data_loader=loader(), noise_multiplier=1.0,
        max_grad_norm=1.0, mode="lazydp",
    )  # fmt: skip
    saved = opt.state_dict()
    for o in (dense, tables):
        o.param_groups[0]["lr"] = 7.0
    shorter = {"optimizers": saved["optimizers"][:1]}
    for bad, held in ((shorter, "1 optimizers' states"), (saved["optimizers"][0], "one opt")):
        with pytest.raises(ConfigError, match=f"got {held}.*wraps 2.*Nothing was loaded"):
            opt.load_state_dict(bad)
    swapped = {"optimizers": saved["optimizers"][::-1]}
    with pytest.raises(ConfigError, match=r"sizes \[2\], the state_dict's has \[6\]"):
        opt.load_state_dict(swapped)
    assert [o.param_groups[0]["lr"] for o in (dense, tables)] == [7.0, 7.0]
    opt.load_state_dict(saved)
    assert [o.param_groups[0]["lr"] for o in (dense, tables)] == [0.01, 0.5]


def test_iterable_dataset_is_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

        def __len__(self):
            return 3

    model = nn.Linear(1, 1)
    with pytest.raises(ConfigError, match="IterableDataset"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(Stream(), batch_size=1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_make_private_with_epsilon_checks_the_loader_before_calibrating(monkeypatch):
    # A dataset with no length raised a bare TypeError there, a private loader was refused as
    # having no batch_size, and a sampler make_private replaces only after the calibration.
    from torch.utils.data import WeightedRandomSampler

    import lazydp.engine

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    class Sized(Stream):
        def __len__(self):
            return 3

    def calibrated(*args, **kwargs):
        raise AssertionError("calibrated for a loader make_private refuses")

    monkeypatch.setattr(lazydp.engine, "calibrate_noise_multiplier", calibrated)
    ds = TensorDataset(torch.randn(100, 3), torch.randn(100))
    _, _, dl, _ = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, batch_size=10))
    weighted = WeightedRandomSampler(torch.ones(100), 100)
    for data_loader, match in [
        (DataLoader(Stream(), batch_size=1), "IterableDataset"),
        (DataLoader(Sized(), batch_size=1), "IterableDataset"),
        (dl, "already a private loader"),
        (DataLoader(ds, batch_size=10, sampler=weighted), "which make_private replaces"),
        ([ds[:10], ds[10:20]], "must be a torch.utils.data.DataLoader"),  # an AttributeError
    ]:
        model = nn.Linear(3, 1)
        with pytest.raises(ConfigError, match=match):
            PrivacyEngine().make_private_with_epsilon(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=data_loader,
                target_epsilon=1.0,
                target_delta=1e-5,
                epochs=1,
                max_grad_norm=1.0,
            )


def test_one_engine_per_model():
    model, opt, dl, engine = private()
    with pytest.raises(ConfigError, match="one engine per model"):
        engine.make_private(
            module=Toy(),
            optimizer=torch.optim.SGD(Toy().parameters(), lr=1),
            data_loader=loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize("call", ["export", "detach", "save_checkpoint"])
def test_releasing_or_detaching_before_make_private_is_refused_by_name(call, tmp_path):
    engine = PrivacyEngine()
    args = () if call == "detach" else (tmp_path / "model.pt",)
    with pytest.raises(ConfigError, match=rf"engine\.{call}\(\) before make_private"):
        getattr(engine, call)(*args)
    assert not (tmp_path / "model.pt").exists()


def _checkpointed(tmp_path):
    """(model, optimizer, engine) after three steps, checkpointed to tmp_path / "ck.pt"."""
    model, opt, _, engine = private(ledger_path=tmp_path / "ledger.jsonl")
    for b in make_batches(3):
        opt.zero_grad()
        loss_fn(model(*b[:3]), b[3]).backward()
        opt.step()
    engine.save_checkpoint(tmp_path / "ck.pt")
    return model, opt, engine


def test_a_checkpoint_is_readable_by_its_owner_only_and_the_model_as_usual(tmp_path):
    """A checkpoint is a private training state, never to be released: it was created 0644
    under the usual umask, readable by every local user; model.pt is the released artefact."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        _, _, engine = _checkpointed(tmp_path)
        engine.save_checkpoint(tmp_path / "ck.pt")  # replacing an earlier one too
        engine.export(tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck.pt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o644


def test_corrupt_checkpoint_and_lowered_ledger_are_refused(tmp_path):
    model, opt, engine = _checkpointed(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes((tmp_path / "ck.pt").read_bytes()[:100])
    model2, opt2, _, engine2 = private(ledger_path=tmp_path / "other.jsonl")
    with pytest.raises(PrivacyError, match="corrupt"):
        engine2.load_checkpoint(bad)
    # A fresh ledger (0 steps) cannot resume a checkpoint taken after 3 charged steps.
    with pytest.raises(PrivacyError, match="lower"):
        engine2.load_checkpoint(tmp_path / "ck.pt")


@pytest.mark.parametrize("record", ["data.pkl", "data/0", "data/3"])
def test_a_checkpoint_with_a_flipped_bit_is_refused_and_changes_nothing(tmp_path, record):
    """torch.load checks no CRC-32: a flipped bit in a weight, a table's history or the lr sums
    (which set the noise every row is owed from then on) loaded without a word."""
    model, opt, engine = _checkpointed(tmp_path)
    raw = bytearray((tmp_path / "ck.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "ck.pt") as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/" + record))
    name, extra = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name + extra + info.file_size // 2] ^= 0x08
    (tmp_path / "bad.pt").write_bytes(raw)
    before = snapshot(model)
    with pytest.raises(PrivacyError, match="corrupt .*earlier complete checkpoint"):
        engine.load_checkpoint(tmp_path / "bad.pt")
    assert engine.ledger.steps == 3 and opt.steps_done == 3
    for k, t in snapshot(model).items():
        assert torch.equal(t, before[k]), k
    engine.load_checkpoint(tmp_path / "ck.pt")  # the intact file still loads


def test_a_checkpoint_with_a_compressed_record_is_refused_before_it_is_inflated(tmp_path):
    """torch.save stores records; torch.load inflated a deflated one whole into memory before
    finding its size wrong (a zip bomb: 400 MB from 400 kB)."""
    _, _, engine = _checkpointed(tmp_path)
    with (
        zipfile.ZipFile(tmp_path / "ck.pt") as src,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w") as dst,
    ):
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                dst.writestr(info.filename, bytes(1 << 20), zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, src.read(info))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
        with pytest.raises(PrivacyError, match="data/0' is compressed.*never writes"):
            engine.load_checkpoint(tmp_path / "bomb.pt")


def test_sgd_mode_report_says_not_private():
    _, _, _, engine = private("sgd")
    report = engine.privacy_report(1e-5)
    assert not report.private and "NOT PRIVATE" in str(report)
    # Nothing bounds a non-private release: infinite, not the 0 of an empty ledger (and JSON
    # gets null, since it has no infinity).
    assert report.epsilon == math.inf == engine.get_epsilon(1e-5)
    assert "epsilon = inf" in str(report)
    assert report.to_dict()["epsilon"] is None and report.to_dict()["private"] is False


def test_noise_override_is_named_in_the_report():
    from lazydp.testing import zero_noise

    _, _, _, engine = private()
    with zero_noise():
        report = engine.privacy_report(1e-5)
    assert not report.private and "override" in str(report)


def test_tensor_dataset_empty_batches_flow_through_loader():
    ds = TensorDataset(torch.randn(200, 3), torch.randn(200))
    model = nn.Linear(3, 1)
    engine = PrivacyEngine(seed=0)
    m, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    sizes = []
    for x, y in dl:
        sizes.append(len(x))
        opt.zero_grad()
        nn.functional.mse_loss(m(x).squeeze(1), y).backward() if len(x) else None
        opt.step()
    assert 0 in sizes  # q = 1/200: many steps are empty, and each is charged
    assert engine.ledger.steps == len(sizes)


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_a_dataset_whose_length_changed_since_make_private_is_refused(change):
    # Shrunk: an IndexError from inside the dataset; grown: the new examples never drawn.
    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = list(torch.randn(100, 3))

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    ds = Rows()
    model, opt, dl, engine = private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, 10))
    if change == "shrink":
        del ds.rows[50:]
    else:
        ds.rows += list(torch.randn(100, 3))
    with pytest.raises(ConfigError, match="holds (50|200) examples, but it held 100"):
        next(iter(dl))
    assert engine.ledger.steps == 0


def test_a_batch_larger_than_the_data_set_warns_that_q_is_capped():
    ds = TensorDataset(torch.randn(10, 3), torch.randn(10))
    with pytest.warns(UserWarning, match="capped at 1"):
        private("dpsgd_f", nn.Linear(3, 1), data_loader=DataLoader(ds, batch_size=32))


def test_make_private_with_epsilon_reads_the_batch_size_of_a_batch_sampler():
    from torch.utils.data import BatchSampler, SequentialSampler

    ds = TensorDataset(torch.randn(64, 3), torch.randn(64))
    dl = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 8, drop_last=False))
    model = nn.Linear(3, 1)
    engine = PrivacyEngine()
    _, _, loader_ = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=dl,
        target_epsilon=3.0,
        target_delta=1e-3,
        epochs=1,
        max_grad_norm=1.0,
    )
    assert engine.privacy.sample_rate == 8 / 64


def _mark_worker(worker_id):
    torch.utils.data.get_worker_info().dataset.marked = True


def test_the_private_loader_keeps_the_users_worker_settings():
    ds = TensorDataset(torch.randn(64, 3), torch.randn(64))
    user = DataLoader(
        ds, batch_size=8, num_workers=1, persistent_workers=True, worker_init_fn=_mark_worker
    )
    _, _, dl, _ = private("dpsgd_f", nn.Linear(3, 1), data_loader=user)
    assert dl.persistent_workers and dl.worker_init_fn is _mark_worker and dl.num_workers == 1


class _ScaledAfterUse(nn.Module):
    """``fc2`` reads ``h``; then ``h`` is scaled in place for another branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        out = self.fc2(h)
        h.mul_(10.0)
        return out + h.sum(1, keepdim=True)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
def test_a_layer_input_modified_in_place_after_the_layer_is_refused(mode):
    # The layers run with detached parameters, so autograd does not notice (plain torch
    # refuses this backward); the clipper would read the modified input at the step.
    torch.manual_seed(0)
    model, opt, _, engine = private(mode, model=_ScaledAfterUse())
    before = snapshot(model)
    model(torch.randn(4, 3)).pow(2).sum(1).mean().backward()
    with pytest.raises(InputError, match="'fc2' was modified in place after the layer read it"):
        opt.step()
    assert engine.ledger.steps == 0
    for k, t in snapshot(model).items():
        assert torch.equal(t, before[k]), k
    # The same model written out of place trains.
    opt.zero_grad()
    h = model.fc1(torch.randn(4, 3))
    (model.fc2(h) + (h * 10).sum(1, keepdim=True)).pow(2).mean().backward()
    if mode == "dpsgd_r":  # its second pass re-runs model(...): the loss must come from it
        with pytest.raises(ConfigError, match="did not come through model"):
            opt.step()
        return
    opt.step()
    assert engine.ledger.steps == 1


class _Recurrent(nn.Module):
    def __init__(self, cell: bool) -> None:
        super().__init__()
        self.rnn = nn.GRUCell(3, 4) if cell else nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rnn, nn.GRU):
            return self.head(self.rnn(x)[0][:, -1])
        h = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.rnn(x[:, t], h)
        return self.head(h)


def test_a_layer_returning_a_tuple_is_refused_with_advice_that_works():
    torch.manual_seed(0)
    model, opt, _, engine = private("dpsgd_f", model=_Recurrent(cell=False))
    with pytest.raises(UnsupportedLayerError, match="nn.GRUCell"):
        model(torch.randn(4, 5, 3))
    # The advice: a GRUCell stepped over the sequence trains.
    model, opt, _, engine = private("dpsgd_f", model=_Recurrent(cell=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch: no batching rule for gru_cell (slow path)
        model(torch.randn(4, 5, 3)).pow(2).mean().backward()
        opt.step()
    assert engine.ledger.steps == 1


class _EmbTop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.top = nn.Linear(3, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.top(self.emb(ids)).squeeze(1)


def _frozen_at_make_private(mode: str):
    torch.manual_seed(0)
    model = _EmbTop()
    model.emb.weight.requires_grad_(False)  # frozen when make_private runs ...
    model, opt, _, engine = private(mode, model=model)
    model.emb.weight.requires_grad_(True)  # ... and trained later (after a warm-up, say)
    return model, opt, engine


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_parameter_frozen_at_make_private_and_trained_later_is_refused(mode):
    # Its layer is not captured: its gradient was replaced by noise alone (dropped).
    model, opt, engine = _frozen_at_make_private(mode)
    before = snapshot(model)
    (100 * model(torch.tensor([0, 1, 1]))).sum().backward()
    with pytest.raises(ConfigError, match=r"\['emb.weight'\] were frozen"):
        opt.step()
    assert engine.ledger.steps == 0
    for k, t in snapshot(model).items():
        assert torch.equal(t, before[k]), k


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_gradient_left_on_a_frozen_parameter_is_never_applied(mode):
    # Frozen again between backward and step: torch's SGD applied autograd's raw gradient
    # (lr * 75 per element against a clip bound of lr * 3 / 8 on the whole step).
    model, opt, engine = _frozen_at_make_private(mode)
    before = model.emb.weight.detach().clone()
    (100 * model(torch.tensor([0, 1, 1]))).sum().backward()
    assert model.emb.weight.grad is not None
    model.emb.weight.requires_grad_(False)
    opt.step()
    assert engine.ledger.steps == 1
    assert torch.equal(model.emb.weight.detach(), before)


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "subset"},
        {"sampler": "weighted"},
        {"sampler": "replacement"},
        {"sampler": "first_k"},
        {"sampler": "first_k_shuffled"},
        {"batch_sampler": "custom"},
    ],
)
def test_a_loader_whose_own_sampler_would_be_dropped_is_refused(options):
    # A SubsetRandomSampler train split used to be replaced by Poisson sampling over the whole
    # dataset: held-out examples trained on, at another sample rate, without a word.
    from torch.utils.data import (
        BatchSampler,
        RandomSampler,
        SequentialSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    ds = TensorDataset(torch.randn(100, 3), torch.randn(100))
    samplers = {
        "subset": SubsetRandomSampler(range(20)),
        "weighted": WeightedRandomSampler(torch.ones(100), 100),
        "replacement": RandomSampler(ds, replacement=True),
        # A train split as the first 20 examples: accepted, then all 100 were trained on.
        "first_k": SequentialSampler(range(20)),
        "first_k_shuffled": RandomSampler(range(20), num_samples=100),
    }
    if "sampler" in options:
        dl = DataLoader(ds, batch_size=10, sampler=samplers[options["sampler"]])
    else:

        class Custom(BatchSampler):
            pass

        dl = DataLoader(ds, batch_sampler=Custom(RandomSampler(ds), 10, drop_last=False))
    with pytest.raises(ConfigError, match=r"which make_private replaces.*Subset"):
        private("dpsgd_f", nn.Linear(3, 1), data_loader=dl)
    for plain in (DataLoader(ds, batch_size=10), DataLoader(ds, batch_size=10, shuffle=True)):
        _, _, dl, _ = private("dpsgd_f", nn.Linear(3, 1), data_loader=plain)  # accepted
    with pytest.raises(ConfigError, match="already a private loader"):
        private("dpsgd_f", nn.Linear(3, 1), data_loader=dl)
    from torch.utils.data.distributed import DistributedSampler

    per_rank = DataLoader(ds, batch_size=10, sampler=DistributedSampler(ds, 2, 0))
    with pytest.raises(ConfigError, match="every rank the full dataset"):
        private("dpsgd_f", nn.Linear(3, 1), data_loader=per_rank)


@pytest.mark.parametrize("name", ["noise_multiplier", "max_grad_norm", "expected_batch_size"])
def test_opacus_optimizer_settings_are_readable_and_refuse_assignment(name):
    # Opacus' noise and clipping schedulers assign optimizer.noise_multiplier / max_grad_norm:
    # a plain attribute took the value and the steps kept the old noise, clipping and charge.
    model, opt, _, engine = private("dpsgd_f")
    assert getattr(opt, name) == getattr(engine.privacy, name)
    with pytest.raises(ConfigError, match=f"optimizer.{name} = 0.5"):
        setattr(opt, name, 0.5)
    assert getattr(opt, name) == getattr(engine.privacy, name)


@pytest.mark.parametrize(
    "kw, advice",
    [
        (dict(poisson_sampling=False), "sampler='shuffle'"),
        (dict(clipping="per_layer"), "clips flat"),
        (dict(grad_sample_mode="ghost"), "mode="),
        (dict(noise_generator=torch.Generator()), r"PrivacyEngine\(seed=...\)"),
        (dict(nosie_multiplier=2.0), "spelling"),
    ],
)
def test_opacus_keywords_are_refused_with_the_lazydp_way(kw, advice):
    # A bare TypeError named the keyword but not what lazydp does instead; through
    # make_private_with_epsilon it came only after the calibration.
    with pytest.raises(ConfigError, match=advice):
        private(**kw)
    with pytest.raises(ConfigError, match=advice):
        _with_epsilon(**kw)
    from lazydp.distributed.engine import DistributedPrivacyEngine

    with pytest.raises(ConfigError, match=advice):  # a bare TypeError there
        DistributedPrivacyEngine(**kw)


def _with_epsilon(**kw):
    model = Toy()
    return PrivacyEngine().make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(),
        target_epsilon=1.0,
        target_delta=1e-5,
        epochs=1,
        max_grad_norm=1.0,
        **kw,
    )


def test_noise_multiplier_given_to_make_private_with_epsilon_is_refused_before_calibrating():
    with pytest.raises(ConfigError, match="calibrates the noise multiplier"):
        _with_epsilon(noise_multiplier=1.0)


def test_opacus_engine_settings_are_refused_with_the_lazydp_way():
    with pytest.raises(ConfigError, match="AES-128-CTR"):
        PrivacyEngine(secure_mode=True)
    with pytest.raises(ConfigError, match="use 'pld'"):
        PrivacyEngine(accountant="prv")


def test_opacus_batch_memory_manager_is_refused_with_the_reason():
    # BatchMemoryManager's sampler calls optimizer.signal_skip_step: it died with an
    # AttributeError from inside torch's DataLoader.
    model, opt, _, engine = private("dpsgd_f")
    with pytest.raises(ConfigError, match="BatchMemoryManager"):
        opt.signal_skip_step(do_skip=True)
    assert engine.ledger.steps == 0


def test_lazydp_tables_off_the_cpu_are_refused_at_make_private():
    """LazyDP's lr sums, noise pool and momentum coefficients live in host memory: a table on
    a GPU failed inside the first catch-up (cpu_tensor.index_select(cuda_index)). The meta
    device stands in for CUDA here (CI has no GPU); dpsgd_f's eager noise runs anywhere."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4, device="meta")
            self.fc = nn.Linear(4, 1)

        def forward(self, ids):
            return self.fc(self.emb(ids)).squeeze(1)

    model = Model()
    data = DataLoader(TensorDataset(torch.arange(8) % 10, torch.zeros(8)), batch_size=4)
    opts = [
        torch.optim.SGD(model.fc.parameters(), 0.1),
        torch.optim.SGD(model.emb.parameters(), 0.1),
    ]
    with pytest.raises(ConfigError, match="host memory.*table 'emb' is on meta.*dpsgd_f"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=opts,
            data_loader=data,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            mode="lazydp",
        )
    assert "forward" not in model.emb.__dict__  # given back uncaptured


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_unsafe_advice(tmp_path, capsys):
    """weights_only refuses the object (nothing runs); torch's message then advised
    weights_only=False, the one thing that would run it."""
    from lazydp.checkpoint_file import CHECKPOINT_FORMAT, load_checkpoint_file

    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": _Payload()}, path)
    with pytest.raises(PrivacyError, match="no lazydp checkpoint contains") as info:
        load_checkpoint_file(path)
    assert "Never load it with weights_only=False" in str(info.value)
    assert "will likely succeed" not in str(info.value)
    assert "must never run" not in capsys.readouterr().out


def test_a_checkpoint_of_another_format_version_says_so(tmp_path):
    """A checkpoint of a newer lazydp was called 'not a lazydp-checkpoint-v1 file', as if it
    were no checkpoint at all, and said nothing of what to do."""
    from lazydp.checkpoint_file import load_checkpoint_file

    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "lazydp-checkpoint-v2", "model": {}}, path)
    with pytest.raises(PrivacyError, match="is a lazydp-checkpoint-v2 file, written by another"):
        load_checkpoint_file(path)
    torch.save({"model": {}}, path)
    with pytest.raises(PrivacyError, match="is not a lazydp-checkpoint-v1 file"):
        load_checkpoint_file(path)
