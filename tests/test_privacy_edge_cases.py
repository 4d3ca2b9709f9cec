"""Edge cases where the stated guarantee used to be wrong or the run lost what it had paid for:
shuffled epochs, calibration for the steps actually run, large delta, tiny sigma, huge step
counts, ledger lines written by hand, a weak delta, distributed shuffle, resume past a target."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lazydp import (
    ConfigError,
    InputError,
    PrivacyEngine,
    PrivacyError,
    UnsupportedOptimizerError,
)
from lazydp.accounting import PLD_MAX_STEPS, MechanismCount, compute_epsilon
from lazydp.cli import main
from lazydp.ledger import PrivacyLedger, StepEvent
from tests.test_engine_errors import private


def test_shuffled_epochs_count_the_steps_a_shuffled_epoch_really_has():
    # N=10, B=3: an epoch is 3 steps (the partial batch is dropped), so 30 steps are 10 epochs;
    # ceil(30 * 0.3) = 9 under-counted one.
    ten = MechanismCount(0.3, 1.0, 30, "shuffle")
    assert ten.epochs == 10
    gaussian_10 = compute_epsilon([MechanismCount(1.0, 1.0, 10)], 1e-5)  # q = 1: no amplification
    assert compute_epsilon([ten], 1e-5) == pytest.approx(gaussian_10, rel=1e-6)


def test_large_delta_tiny_sigma_and_huge_step_counts_answer_quickly():
    started = time.perf_counter()
    near_zero = compute_epsilon([MechanismCount(0.087, 0.5, 2)], 0.1)  # took minutes before
    assert 0 < near_zero < 0.01
    tiny = compute_epsilon([MechanismCount(0.087, 1e-6, 11)], 1e-3)  # asked for 364 TiB before
    assert tiny > 1e6
    huge = [MechanismCount(0.087, 1.0, PLD_MAX_STEPS + 1)]
    assert compute_epsilon(huge, 1e-3) == compute_epsilon(huge, 1e-3, "rdp")  # valid upper bound
    assert time.perf_counter() - started < 60  # generous: a hang, not a speed target


def _data(n):
    return TensorDataset(torch.randn(n, 3), torch.randn(n, 1))


def _train(engine, model, opt, loader, epochs):
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()


@pytest.mark.parametrize(
    ("n", "batch", "kw"),
    [
        (13, 5, {"sampler": "shuffle"}),  # calibrated as Poisson before: 2x the target
        (13, 5, {}),  # round(1/q) = 3 steps an epoch; ceil(epochs / q) calibrated 2.6
        (100, 10, {"steps_per_epoch": 20}),  # twice the steps of 1/q
    ],
)
def test_training_for_the_calibrated_epochs_ends_within_the_target(n, batch, kw):
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine(seed=0)
    epochs = 4
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(n), batch_size=batch),
        target_epsilon=2.0,
        target_delta=1e-3,
        epochs=epochs,
        max_grad_norm=1.0,
        **kw,
    )
    _train(engine, model, opt, loader, epochs)
    assert engine.get_epsilon(1e-3) <= 2.0
    assert engine.get_epsilon(1e-3) > 1.9  # and the calibration is not merely loose


@pytest.mark.parametrize("epochs", [0, -1, float("nan"), "3"])
def test_calibration_refuses_nonsense_epochs(epochs):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ConfigError, match="epochs"):
        PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(64), batch_size=8),
            target_epsilon=2.0,
            target_delta=1e-5,
            epochs=epochs,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("steps_per_epoch", [0, -2, 2.5, "5"])
def test_nonsense_steps_per_epoch_is_refused_under_its_name(calibrated, steps_per_epoch):
    # 0 silently meant the default, a string raised a TypeError from round() in the
    # calibration, and the rest were refused as "steps".
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine()
    args = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(64), batch_size=8),
        max_grad_norm=1.0,
        steps_per_epoch=steps_per_epoch,
    )
    with pytest.raises(ConfigError, match="steps_per_epoch must be a positive integer"):
        if calibrated:
            engine.make_private_with_epsilon(
                target_epsilon=2.0, target_delta=1e-5, epochs=1, **args
            )
        else:
            engine.make_private(noise_multiplier=1.0, **args)


def _make_private(model, opt, engine=None, **kw):
    return (engine or PrivacyEngine()).make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(_data(64), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        **kw,
    )


def test_refused_set_ups():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ConfigError, match="single-process only"):
        _make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), sampler="shuffle", world_size=2
        )
    with pytest.raises(UnsupportedOptimizerError, match="LBFGS"):
        _make_private(model, torch.optim.LBFGS(model.parameters()))
    table = torch.nn.Embedding(10, 2, sparse=True)
    with pytest.raises(UnsupportedOptimizerError, match="SparseAdam takes sparse gradients"):
        _make_private(table, torch.optim.SparseAdam(table.parameters()))
    frozen = torch.nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        _make_private(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1))


def test_a_delta_of_one_over_n_or_more_is_flagged():
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine()
    model, opt, loader = _make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), engine)
    _train(engine, model, opt, loader, 1)
    assert any("WEAK DELTA" in c for c in engine.privacy_report(0.05).caveats)  # 1/64 = 0.016
    assert not any("WEAK DELTA" in c for c in engine.privacy_report(1e-3).caveats)
    # Below 1/N but large in itself (N = 64 is tiny): flagged apart; 1e-3 is not.
    caveats = engine.privacy_report(0.01).caveats
    assert any("LARGE DELTA" in c for c in caveats) and not any("WEAK" in c for c in caveats)
    assert not any("DELTA" in c for c in engine.privacy_report(1e-3).caveats)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ({"kind": "external", "name": "x", "epsilon": -5, "delta": 1e-6}, "epsilon"),
        ({"kind": "external", "name": "x", "epsilon": "5", "delta": 1e-6}, "epsilon"),
        (
            {
                **StepEvent(0, 0.1, 1.0, 1.0, "lazydp", "poisson").__dict__,
                "kind": "step",
                "sample_rate": "abc",
            },
            "sample_rate",
        ),
        (
            {
                **StepEvent(0, 0.1, 1.0, 1.0, "lazydp", "poisson").__dict__,
                "kind": "step",
                "mode": "xx",
            },
            "mode",
        ),
    ],
)
def test_ledger_lines_are_checked_as_charging_checks_them(tmp_path, line, match):
    path = tmp_path / "ledger.jsonl"
    PrivacyLedger(path).charge(StepEvent(0, 0.1, 1.0, 1.0, "lazydp", "poisson"))
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(PrivacyError, match=f"line 3: .*{match}"):
        PrivacyLedger(path)


def test_ledger_paths_that_cannot_be_a_ledger(tmp_path):
    with pytest.raises(PrivacyError, match="is a directory"):
        PrivacyLedger(tmp_path)
    bad = tmp_path / "bad.jsonl"
    # (read line by line: the first problem in file order is named; this header is valid)
    header = b'{"kind": "header", "format": "lazydp-privacy-ledger", "version": 1}\n'
    bad.write_bytes(header + b"\xff\xfe\n")
    with pytest.raises(PrivacyError, match=f"not UTF-8 text \\(byte {len(header)}\\)"):
        PrivacyLedger(bad)
    fresh = PrivacyLedger(tmp_path / "new" / "dir" / "ledger.jsonl")  # parents are created
    fresh.charge(StepEvent(0, 0.1, 1.0, 1.0, "lazydp", "poisson"))
    assert fresh.steps == 1


def test_a_resumed_calibrated_run_stops_at_the_steps_it_was_calibrated_for(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "r"
    args = ["train", "--dataset", "acs", "--epochs", "2", "--target-epsilon", "3"]
    args += ["--out", str(out), "--checkpoint-every", "4", "--json", "--no-progress"]
    save = PrivacyEngine.save_checkpoint
    with monkeypatch.context() as m:  # killed after step 10, before its final checkpoint
        m.setattr(
            PrivacyEngine,
            "save_checkpoint",
            lambda self, path, step, **kw: (
                None if step == 10 else save(self, path, step=step, **kw)
            ),
        )
        assert main(args) == 0  # 10 steps, checkpoints at steps 4 and 8
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # resumes at step 8 with 10 steps charged
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ledger = (out / "ledger.jsonl").read_text().count('"kind":"step"')
    assert result["stopped_for_budget"] is True
    assert ledger == 10 and result["steps"] == 8  # redoing steps 9-10 would pass the target
    assert result["privacy"]["epsilon"] <= 3.0


def test_steps_on_batches_the_private_loader_did_not_draw_are_flagged():
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine()
    original = DataLoader(_data(64), batch_size=8)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=original,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    _train(engine, model, opt, loader, 1)
    assert not any("UNVERIFIED" in c for c in engine.privacy_report(1e-3).caveats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.get_epsilon(1e-3)  # every batch from the private loader: no warning
    _train(engine, model, opt, original, 1)  # the user's own loader: no Poisson sampling
    assert any("UNVERIFIED SAMPLING" in c for c in engine.privacy_report(1e-3).caveats)
    with pytest.warns(UserWarning, match="did not draw"):  # the bare figure says so too
        engine.get_epsilon(1e-3)


def test_a_refused_step_retried_on_its_batch_is_not_flagged_as_unsampled():
    # The refused step counted as a step with data: its batch, cleaned and retried, then
    # looked like a batch the private loader never drew (a false UNVERIFIED SAMPLING).
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine()
    model, opt, loader = _make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), engine)
    x, y = next(iter(loader))
    spoiled = x.clone()
    spoiled[0, 0] = float("nan")
    for features in (spoiled, x):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(features), y).backward()
        try:
            opt.step()
        except InputError:
            assert features is spoiled
    assert engine.ledger.steps == 1
    assert not any("UNVERIFIED" in c for c in engine.privacy_report(1e-3).caveats)


class _TimeMajor(torch.nn.Module):
    """A layer run on (T, B, d): dimension 0 is time, not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.transpose(0, 1)).mean(0)


def test_layers_that_see_fewer_rows_than_the_batch_get_a_warning_and_a_caveat():
    # T = 4 time steps, batches of ~16: each time step was clipped as an example, 4.6x the
    # bound in an audit, with nothing said.
    data = TensorDataset(torch.randn(64, 4, 3), torch.randn(64, 1))
    model, opt, loader, engine = private(
        "dpsgd_f", _TimeMajor(), data_loader=DataLoader(data, batch_size=16)
    )
    with pytest.warns(UserWarning, match="time-major"):
        _train(engine, model, opt, loader, 1)
    assert any(
        c.startswith("FEWER ROWS THAN EXAMPLES") for c in engine.privacy_report(1e-3).caveats
    )


def test_training_past_the_calibrated_epochs_is_flagged():
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(64), batch_size=8),
        target_epsilon=2.0,
        target_delta=1e-3,
        epochs=2,
        max_grad_norm=1.0,
    )
    _train(engine, model, opt, loader, 2)
    assert not any("OVER TARGET" in c for c in engine.privacy_report(1e-3).caveats)
    _train(engine, model, opt, loader, 1)
    assert any("OVER TARGET" in c for c in engine.privacy_report(1e-3).caveats)


def test_datasets_without_a_length_and_bad_world_sizes_are_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from _data(8)

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="IterableDataset"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=DataLoader(Stream(), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    with pytest.raises(ConfigError, match="world_size"):
        _make_private(model, opt, world_size=0)


def _movielens_csv(path, rows=600, seed=0):
    """A synthetic MovieLens-format file whose ids repeat enough to pass a DP vocabulary."""
    g = torch.Generator().manual_seed(seed)
    lines = ["userId,movieId,rating,timestamp,title,genres"]
    for i in range(rows):
        user, movie = (
            int(torch.randint(1, 8, (1,), generator=g)),
            int(torch.randint(1, 6, (1,), generator=g)),
        )
        rating = float(torch.randint(1, 6, (1,), generator=g))
        lines.append(f"{user},{movie},{rating},{1260759144 + i},Movie {movie} (1995),Drama|Comedy")
    path.write_text("\n".join(lines) + "\n")
    return path


def _dp_data(tmp_path, name, epsilon, seed=None):
    from lazydp.preprocess.pipeline import preprocess

    out = tmp_path / name
    preprocess(
        "movielens",
        [_movielens_csv(tmp_path / f"{name}.csv")],
        out,
        vocabulary="dp",
        vocab_epsilon=epsilon,
        vocab_delta=1e-6,
        vocab_seed=seed,
        progress=False,
    )
    return out


def test_resume_on_other_preprocessed_data_is_refused_and_seeded_vocabularies_are_not_private(
    tmp_path, capsys
):
    first, other = _dp_data(tmp_path, "a", 1.0), _dp_data(tmp_path, "b", 2.0)
    run = ["train", "--max-steps", "2", "--noise-multiplier", "1", "--batch-size", "64"]
    run += ["--delta", "1e-4", "--embedding-dim", "4", "--no-progress", "--json"]
    out = ["--out", str(tmp_path / "r"), "--checkpoint-every", "1"]
    assert main([*run, "--data", str(first), *out]) == 0
    assert main([*run, "--data", str(first), *out, "--resume"]) == 0  # same data: fine
    capsys.readouterr()
    assert main([*run, "--data", str(other), *out, "--resume"]) == 1
    assert "other preprocessed data" in capsys.readouterr().err
    ledger = PrivacyLedger(tmp_path / "r" / "ledger.jsonl")
    assert [c.epsilon for c in ledger.external] == [1.0]  # charged once

    seeded = _dp_data(tmp_path, "s", 1.0, seed=1)
    assert main([*run, "--data", str(seeded), "--out", str(tmp_path / "s")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["privacy"]
    assert report["private"] is False
    assert any("--vocab-seed" in c for c in report["caveats"])


def test_data_preprocessed_again_while_a_run_sets_up_is_not_charged_under_its_name(
    tmp_path, monkeypatch, capsys
):
    """`lazydp preprocess --overwrite` (new rows, a new DP vocabulary of the same epsilon)
    landing while a run set up: the ledger charged the old data's vocabulary under the new
    metadata's digest, so a --resume on the new data passed as already paid for."""
    from lazydp import training
    from lazydp.preprocess.pipeline import preprocess

    data = _dp_data(tmp_path, "a", 1.0)
    newer = _movielens_csv(tmp_path / "newer.csv", rows=650)  # 50 more ratings, same ids
    real = training.model_and_optimizers

    def preprocessed_again(*args, **kwargs):
        preprocess(
            "movielens", [newer], data, vocabulary="dp", vocab_epsilon=1.0, vocab_delta=1e-6,
            overwrite=True, progress=False,
        )  # fmt: skip
        return real(*args, **kwargs)

    run = ["train", "--data", str(data), "--max-steps", "1", "--noise-multiplier", "1"]
    run += ["--out", str(tmp_path / "r"), "--delta", "1e-4", "--batch-size", "64"]
    run += ["--embedding-dim", "4", "--checkpoint-every", "1", "--no-progress"]
    monkeypatch.setattr(training, "model_and_optimizers", preprocessed_again)
    assert main(run) == 0
    monkeypatch.setattr(training, "model_and_optimizers", real)
    capsys.readouterr()
    assert main([*run, "--resume", "--max-steps", "2"]) == 1
    assert "other preprocessed data" in capsys.readouterr().err


def test_resuming_with_more_processes_than_the_run_started_with_says_so(tmp_path, capsys):
    from lazydp.train_config import TrainConfig
    from lazydp.training import run

    out = tmp_path / "r"
    args = ["train", "--dataset", "acs", "--max-steps", "2", "--noise-multiplier", "1"]
    assert main([*args, "--out", str(out), "--checkpoint-every", "1", "--no-progress"]) == 0
    cfg = TrainConfig(
        dataset="acs", max_steps=3, noise_multiplier=1.0, out=str(out), resume=True, progress=False
    )
    with pytest.raises(ConfigError, match="another number of processes"):
        run(cfg, rank=1, world_size=2)  # refused before any process-group call


@pytest.mark.parametrize(
    ("edit", "outcome"),
    [
        ({"epsilon": 0.0}, 1.0),  # edited down: the recorded parameters still say 1.0
        ({"epsilon": "1.0"}, "is not a finite number"),
        (None, 1.0),  # deleted
    ],
)
def test_an_edited_vocabulary_cost_is_never_charged_low(tmp_path, capsys, edit, outcome):
    data = _dp_data(tmp_path, "a", 1.0)
    meta_path = data / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["privacy_cost"] = None if edit is None else {**meta["privacy_cost"], **edit}
    meta_path.write_text(json.dumps(meta))
    run = ["train", "--data", str(data), "--max-steps", "1", "--noise-multiplier", "1"]
    run += ["--out", str(tmp_path / "r"), "--delta", "1e-4", "--batch-size", "64", "--no-progress"]
    code = main(run)
    if isinstance(outcome, str):
        assert code == 1 and outcome in capsys.readouterr().err
        return
    assert code == 0
    ledger = PrivacyLedger(tmp_path / "r" / "ledger.jsonl")
    assert [c.epsilon for c in ledger.external] == [outcome]


def test_the_vocabulary_delta_comes_out_of_the_runs_delta(tmp_path, capsys):
    # Deltas add (basic composition): training gets --delta minus the vocabulary's, so the
    # run's whole guarantee is stated at the delta asked for, not above it.
    data = _dp_data(tmp_path, "a", 1.0)  # vocabulary delta 1e-6
    run = ["train", "--data", str(data), "--max-steps", "2", "--batch-size", "64"]
    run += ["--target-epsilon", "8", "--epochs", "1", "--no-progress", "--json"]
    assert main([*run, "--delta", "1e-4", "--out", str(tmp_path / "r")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["privacy"]
    assert report["delta"] <= 1e-4 and report["delta"] == pytest.approx(1e-4)
    assert report["epsilon"] <= 8.0
    assert main([*run, "--delta", "1e-6", "--out", str(tmp_path / "s")]) == 1
    assert "already spent by preprocessing" in capsys.readouterr().err
    assert not (tmp_path / "s" / "ledger.jsonl").exists()  # refused before any charge
