"""PrivacyEngine: the one place that wires the DP stages together.

    sampler -> batch -> forward (capture) -> backward (capture) -> norms -> clip factors
            -> ledger -> clipped sums -> [all-reduce] -> noise (eager | lazy) -> update

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lazydp import PrivacyEngine
    >>> data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    >>> model = torch.nn.Linear(4, 1)
    >>> engine = PrivacyEngine(seed=0)
    >>> model, opt, loader = engine.make_private(
    ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    ...     data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    >>> for x, y in loader:
    ...     opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
    >>> engine.get_epsilon(1e-5) > 0
    True
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import (
    DataLoader,
)

from lazydp import _validate as v
from lazydp._timing import PhaseTimer
from lazydp.accounting import SAMPLERS, calibrate_noise_multiplier, steps_for_epochs
from lazydp.capture import CaptureSet, copy_refused
from lazydp.checkpoint_checks import CheckpointChecks
from lazydp.checkpoint_file import (
    CHECKPOINT_FORMAT,
    atomic_save,
    check_extra,
    load_checkpoint_file,
    owned_except_copied,
    released_state,
)
from lazydp.errors import ConfigError
from lazydp.ledger import PrivacyLedger
from lazydp.loader import DPDataLoader, worker_options
from lazydp.loader_checks import batch_size_of, dataset_size, loader_epoch_steps
from lazydp.noise import GaussianNoise, active_override
from lazydp.optim.dp_optimizer import DPOptimizer, PrivacyParams
from lazydp.optim.group import OptimizerGroup
from lazydp.report import PrivacyReport, build_report
from lazydp.sampling import PoissonSampling, ShuffledFixedSize

MODES = v.MODES

# The ledger of the private engine that last trained each model in this process: a later engine
# on another ledger (fine-tuning after detach) does not count those steps (_earlier_ledger).
_LEDGER_OF: weakref.WeakKeyDictionary[nn.Module, PrivacyLedger] = weakref.WeakKeyDictionary()


class PrivacyEngine(CheckpointChecks):
    """Makes a model, optimizer and data loader differentially private (Opacus-style API).

    Args:
        accountant: "pld" (default, tight) or "rdp"; both are always reported.
        seed: None (default) seeds sampling and noise from OS entropy. An int makes the run
            reproducible -- for research only; the privacy report then says so.
        ledger_path: JSON-lines privacy ledger; an existing file is resumed, never reset.
    """

    def __init__(
        self,
        accountant: str = "pld",
        seed: int | None = None,
        ledger_path: str | os.PathLike[str] | None = None,
        **unknown: Any,
    ) -> None:
        _refuse_unknown("PrivacyEngine", unknown)
        if accountant == "prv":
            raise ConfigError(
                "accountant='prv' (Opacus' default) is not a lazydp accountant: use 'pld' "
                "(lazydp's default), the same kind of tight numerical accounting (privacy loss "
                "distributions); 'rdp' is also available."
            )
        v.check_choice("accountant", accountant, ("pld", "rdp"))
        self.accountant = accountant
        self.seed = seed
        self.ledger = PrivacyLedger(ledger_path)
        self.timer = PhaseTimer()
        self.optimizer: DPOptimizer | None = None
        self.module: nn.Module | None = None
        self.capture: CaptureSet | None = None
        self.loader: DataLoader | None = None
        self.privacy: PrivacyParams | None = None
        self.noise: GaussianNoise | None = None
        # The (epsilon, delta, steps) the noise was calibrated for: the report flags overruns.
        self.target: dict[str, Any] | None = None
        self._suppress_flush = False
        self._hooks: list[Any] = []
        self._resumed_seeded = False  # a checkpoint of a run the user seeded was loaded
        # (where, steps) of another ledger that charged this model's earlier private training.
        self._earlier: tuple[str, int] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:  # reached through a table's hook
        raise copy_refused()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise copy_refused()

    # ------------------------------------------------------------------ set-up
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer | Sequence[Optimizer],
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        mode: str = "dpsgd_f",
        sampler: str = "poisson",
        loss_reduction: str = "mean",
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        **unknown: Any,
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Return (module, optimizer, data_loader) that train with DP-SGD in ``mode``.

        The module is the same object (its parameterised layers are captured in place); the
        optimizer wraps yours and keeps its param_groups; the loader draws batches with
        Poisson sampling at rate q = data_loader.batch_size / len(dataset). Opacus' own
        keywords (``poisson_sampling``, ``clipping``, ``grad_sample_mode``, ...) are refused
        with the lazydp way to get the same.
        """
        _refuse_unknown("make_private", unknown)
        v.check_mode(mode)
        v.check_choice("sampler", sampler, SAMPLERS)
        v.check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        v.check_noise_multiplier(noise_multiplier)
        # No clipping (C = inf) only makes sense with no noise: the "equals plain SGD" check.
        v.check_max_grad_norm(max_grad_norm, allow_inf=noise_multiplier == 0)
        if self.module is not None:
            raise ConfigError(
                "this PrivacyEngine already made a model private; use one engine per model "
                "(its ledger belongs to that training run)."
            )
        world_size = v.check_positive_int("world_size", world_size)
        n = dataset_size(data_loader)
        if sampler == "shuffle" and world_size > 1:
            # Each rank would shuffle the whole dataset: examples in two ranks' batches of one
            # step (sensitivity 2C) and a global batch W times the stated one.
            raise ConfigError(
                "sampler='shuffle' is single-process only; distributed training samples with "
                "Poisson (the default), which each rank draws for its own shard."
            )
        if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in [module]):
            raise ConfigError(
                "module is wrapped in DistributedDataParallel, which averages *unclipped* "
                "gradients; pass the bare model and use lazydp.distributed instead."
            )
        optimizers = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
        if not optimizers or not all(isinstance(o, Optimizer) for o in optimizers):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer or a list of them, got {optimizer!r}"
            )
        dataset = data_loader.dataset
        batch_size = batch_size_of(data_loader, n)
        n_global = n  # each rank passes the full dataset; the sampler picks its shard
        q = min(1.0, batch_size / n_global)
        if batch_size > n_global:
            warnings.warn(
                f"batch_size={batch_size} exceeds the {n_global} examples: the sample rate is "
                f"capped at 1, so every step uses every example (expected batch {n_global}) and "
                "subsampling amplifies nothing. Use a batch size well below the data set size.",
                stacklevel=2,
            )
        v.check_sample_rate(q)
        steps = loader_epoch_steps(sampler, n, batch_size, q, steps_per_epoch)
        batch_sampler = self._make_sampler(sampler, n, q, batch_size, steps, rank, world_size)
        loader = DPDataLoader(
            dataset,
            batch_sampler,
            collate_fn=data_loader.collate_fn,
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
            **worker_options(data_loader),
        )
        self.loader = loader
        self.module = module
        self.privacy = PrivacyParams(
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            sample_rate=q,
            expected_batch_size=q * n_global,
            mode=mode,
            sampler=sampler,
            loss_reduction=loss_reduction,
        )
        if mode == "sgd":  # the non-private reference: the same data, nothing else changes
            plain = optimizers[0] if len(optimizers) == 1 else OptimizerGroup(optimizers)
            return module, plain, loader
        self.noise = self._make_noise(rank, world_size)
        try:
            self.capture = CaptureSet(module, capture_root=(mode == "dpsgd_r"))
            self.optimizer = DPOptimizer(
                optimizers,
                self.capture,
                self.privacy,
                self.noise,
                self.ledger,
                self.timer,
                rank=rank,
            )
        except BaseException:
            # A refused set-up gives the model back and leaves this engine unused: the corrected
            # call must not be told that an engine already holds the model (a layer refused
            # by the capture itself included: it gave the model back already).
            if self.capture is not None:
                self.capture.remove()
            self.capture = self.module = self.loader = None
            raise
        self._earlier = _earlier_ledger(module, self.ledger)
        for part in module.modules():  # the model under a new head, or a part fine-tuned alone
            _LEDGER_OF[part] = self.ledger
        if self._earlier is not None:
            warnings.warn(_earlier_text(*self._earlier, self.ledger), stacklevel=2)
        self.optimizer.check_rows = loader.check_rows
        self.optimizer.check_skipped = loader.check_skipped
        self.optimizer.shuffle_position = loader.shuffle_position
        if mode == "lazydp":
            loader.on_epoch_end = self.flush
            for layer in self.capture.layers:
                if layer.is_table:
                    self._hooks += self._table_hooks(layer.module)
        return module, self.optimizer, loader

    def _table_hooks(self, module: nn.Module) -> list[Any]:
        """A LazyDP table is flushed before its state is read (``state_dict``: no stale value
        leaves) and before one is loaded into it: the pending noise belongs to the values
        being replaced, so after ``model.load_state_dict(...)`` mid-run the table holds exactly
        what was loaded, as under eager DP-SGD, instead of the loaded values plus the old
        rows' deferred noise. A load that fails leaves a flushed, correct table."""
        return [
            module.register_state_dict_pre_hook(self._on_export),
            module._register_load_state_dict_pre_hook(self._on_export),
        ]

    # Extension points (lazydp.distributed overrides them; nothing else should need to).
    def _make_sampler(
        self,
        sampler: str,
        n: int,
        q: float,
        batch_size: int,
        steps: int,
        rank: int,
        world_size: int,
    ) -> Any:
        """The batch sampler: Poisson at rate q over all n examples (this rank's shard if W > 1)."""
        if sampler == "shuffle":
            seed = None if self.seed is None else self.seed + 7919 * rank
            return ShuffledFixedSize(n, batch_size, seed=seed)
        if world_size > 1:
            from lazydp.sampling import DistributedPoissonSampling

            return DistributedPoissonSampling(
                n, q, rank=rank, world_size=world_size, steps=steps, seed=self.seed
            )
        return PoissonSampling(n, q, steps=steps, seed=self.seed)

    def _make_noise(self, rank: int, world_size: int) -> GaussianNoise:
        """The noise source; tables fork independent streams from it."""
        return seeded_root(self.seed, self.ledger.steps)

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer | Sequence[Optimizer],
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        max_grad_norm: float,
        **kwargs: Any,
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """As ``make_private``, with the smallest noise multiplier whose epsilon <= target."""
        # Before the calibration (seconds for long runs), not after it in make_private.
        _refuse_unknown(
            "make_private_with_epsilon", {k: a for k, a in kwargs.items() if k not in _FORWARDED}
        )
        v.check_epsilon(target_epsilon)
        v.check_delta(target_delta)
        v.check_epochs(epochs)
        n = dataset_size(data_loader)  # refused here, not after calibrating for it
        batch_size = batch_size_of(data_loader, n)
        q = min(1.0, batch_size / n)
        v.check_sample_rate(q)
        sampler = kwargs.get("sampler", "poisson")
        v.check_choice("sampler", sampler, SAMPLERS)
        # Calibrate for the steps the loader will run in ``epochs`` (ceil(epochs/q) was fewer
        # than both kinds of epoch, and training for ``epochs`` then overshot the target).
        per_epoch = loader_epoch_steps(sampler, n, batch_size, q, kwargs.get("steps_per_epoch"))
        steps = steps_for_epochs(epochs, per_epoch)
        sigma = calibrate_noise_multiplier(
            target_epsilon, target_delta, q, steps, accountant=self.accountant, sampler=sampler
        )
        self.target = {"epsilon": target_epsilon, "delta": target_delta, "steps": steps}
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    # ------------------------------------------------------------------ privacy
    def get_epsilon(self, delta: float, accountant: str | None = None) -> float:
        """Epsilon spent so far at ``delta``, recomputed from the ledger; infinite in mode
        ``sgd`` (nothing is clipped or noised, so nothing bounds it)."""
        v.check_delta(delta)
        if self.privacy is not None and self.privacy.mode == "sgd":
            return math.inf
        unsampled = self._unsampled_steps()
        if unsampled:
            warnings.warn(
                f"{unsampled} step(s) trained on batches the private data loader did not draw: "
                "this epsilon assumes Poisson sampling of every batch and does not hold for "
                "them (privacy_report() lists it as UNVERIFIED SAMPLING). Iterate the loader "
                "make_private returned.",
                stacklevel=2,
            )
        return self.ledger.epsilon(delta, accountant=accountant or self.accountant)

    def _unsampled_steps(self) -> int:
        if self.optimizer is not None and isinstance(self.loader, DPDataLoader):
            return max(0, self.optimizer.steps_with_data - self.loader.batches_drawn)
        return 0

    def privacy_report(self, delta: float) -> PrivacyReport:
        """Epsilon (PLD and RDP), mode, sampler, steps, and every caveat that applies."""
        report = build_report(
            self.ledger,
            delta,
            self.privacy,
            seeded=self._seeded(),
            override=active_override(),
            unsampled_steps=self._unsampled_steps(),
            short_steps=self.loader.short_steps if isinstance(self.loader, DPDataLoader) else 0,
        )
        if self._earlier is not None:
            report.caveats.append(
                f"EARLIER TRAINING NOT COUNTED: {_earlier_text(*self._earlier, self.ledger)}"
            )
        target = self.target
        if target is not None and delta == target["delta"] and report.epsilon > target["epsilon"]:
            why = (
                "training ran past its epochs"
                if self.ledger.steps > target["steps"]
                else "some steps ran at other settings (a resumed run calibrated for its own "
                "steps, not counting those an earlier run had spent)"
            )
            report.caveats.append(
                f"OVER TARGET: epsilon {report.epsilon:.4g} exceeds the target "
                f"{target['epsilon']:g} the noise was calibrated for ({self.ledger.steps} steps "
                f"charged, {target['steps']} planned): {why}."
            )
        return report

    # ------------------------------------------------------------------ lazy noise
    def flush(self) -> None:
        """Apply all pending LazyDP noise to every row (automatic at epoch end and export)."""
        if self.optimizer is None:
            return
        # Even a checkpoint (no full flush) must hold the rows a forward caught up into a
        # deferred block: their history already counts that noise.
        self.optimizer.settle()
        if not self._suppress_flush:
            self.optimizer.flush()

    def _on_export(self, *args: Any, **kwargs: Any) -> None:
        self.flush()

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Save the fully flushed model's state_dict (the releasable artefact)."""
        self._check_made_private("export")
        self.flush()
        assert self.module is not None
        return atomic_save(released_state(self.module.state_dict()), path)

    # ------------------------------------------------------------------ checkpoints
    @contextmanager
    def _no_flush(self) -> Any:
        self._suppress_flush = True
        try:
            yield
        finally:
            self._suppress_flush = False

    def save_checkpoint(self, path: str | os.PathLike[str], **extra: Any) -> Path:
        """A private training state (optimizer, history, ledger position): never release it.

        Under lazydp the tables are flushed first (O(table), like an epoch end), so the
        checkpoint owes no noise. One that did would draw the noise of steps already charged
        afresh at every load: K loads and exports of one checkpoint average that noise down
        by sqrt(K), and a roll-back to it would release the same steps' noise twice, uncharged.

        Atomic: written to a temporary file and renamed, so a checkpoint exists only complete.
        """
        self._check_made_private("save_checkpoint")
        assert self.module is not None and self.privacy is not None
        check_extra(extra)
        self.flush()
        extra = self._checkpoint_extra(extra)
        with self._no_flush():
            state: dict[str, Any] = {
                "format": CHECKPOINT_FORMAT,
                "private_training_state": True,
                "model": self.module.state_dict(),
                "privacy": asdict(self.privacy),
                "ledger_steps": self.ledger.steps,
                "seeded": self._seeded(),
                "extra": extra,
            }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["optimizer_kinds"] = [type(o).__name__ for o in self.optimizer.originals]
            state["lazy"] = self.optimizer.lazy_state_dict()
        if self.noise is not None:
            state["noise"] = self.noise.state_dict()
        if isinstance(self.loader, DPDataLoader):
            state["sampler"] = self.loader.sampler_state()
        # Never to be released: not readable by every local user (0644 under the usual umask).
        return atomic_save(state, path, private=True)

    def _check_made_private(self, call: str) -> None:
        """ConfigError for ``call`` on an engine that holds no model (an AssertionError with no
        message before, or an AttributeError under ``python -O``)."""
        if self.module is None or self.privacy is None:
            raise ConfigError(
                f"engine.{call}() before make_private: this engine holds no model. Call "
                "make_private (or make_private_with_epsilon) first."
            )

    def _dp_sampler(self) -> Any:
        """The private loader's batch sampler (it keeps a position), or None before one."""
        return self.loader.dp_sampler if isinstance(self.loader, DPDataLoader) else None

    def _checkpoint_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``extra`` plus the state a subclass keeps outside the model (read after the flush)."""
        return extra

    # Outside inference mode, also when called in it (an evaluation block): the state it
    # creates (LazyDP's lr sums, the optimizers' buffers) were inference tensors there, which
    # the next step could not write: torch's RuntimeError 'Inplace update to inference tensor
    # outside InferenceMode', raised after that step was charged and some rows were updated.
    @torch.inference_mode(False)
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        check_extra: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Restore a checkpoint into the private model; the ledger is never lowered.

        ``check_extra`` sees the ``extra`` that save_checkpoint stored before anything else is
        checked or loaded (a caller's own refusal then comes first and changes nothing)."""
        self._check_made_private("load_checkpoint")
        assert self.module is not None
        state = owned_except_copied(load_checkpoint_file(path, mmap=True))
        if check_extra is not None:
            extra = state.get("extra")
            check_extra(extra if isinstance(extra, dict) else {})
        self._check_checkpoint(state, path)  # all of it first: a resume loads all or nothing
        with self._no_flush():
            self.module.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.optimizer.load_lazy_state_dict(state["lazy"])
        if self.noise is not None and "noise" in state:
            self.noise.load_state_dict(state["noise"])
            self._rekey_noise()
        sampler = self._dp_sampler()
        if sampler is not None and "sampler" in state:
            assert isinstance(self.loader, DPDataLoader)
            # A shuffled loader hands out no batch a charged step may have taken (see restore).
            used = self.ledger.last_position(state["sampler"].get("lineage"))
            redone = self.ledger.steps - int(state["ledger_steps"])
            self.loader.restore(state["sampler"], used, redone)
        # The resumed run draws from the checkpoint's noise streams: still a reproducible run.
        self._resumed_seeded = self._resumed_seeded or bool(state.get("seeded", False))
        return dict(state.get("extra", {}))

    def _rekey_noise(self) -> None:
        """Fresh streams for a resumed run (DP invariant 5: no stream reused across restarts).

        Restored as saved, a seeded run would redraw, for the steps it redoes, exactly the
        noise the run that went past this checkpoint drew for them -- on other gradients
        when its batches differ (another sampler seed, or a roll-back to an older
        checkpoint). Two released models would then differ by noiseless gradients. Seeded
        streams move to one derived from the charged step count (a resumed seeded run is
        still reproducible, but not a replay); unseeded ones draw OS entropy anyway."""
        assert self.noise is not None
        self.noise.rekey_(self.noise.seed, [1 + self.ledger.steps])

    def _seeded(self) -> bool:
        """Whether the user gave a seed, to this run or to the one it resumes (the distributed
        engine's noise is seeded from a broadcast secret: that is not a user seed)."""
        return self.seed is not None or self._resumed_seeded

    def detach(self) -> nn.Module:
        """Flush and hand back the plain model (captures and hooks removed); this engine's
        optimizer then refuses to step (it would no longer see the model's examples)."""
        self._check_made_private("detach")
        self.flush()
        if self.optimizer is not None:
            self.optimizer.detached = True
        for h in self._hooks:
            h.remove()
        if self.capture is not None:
            self.capture.remove()
        assert self.module is not None
        return self.module


# make_private's keywords that make_private_with_epsilon passes on.
_FORWARDED = ("mode", "sampler", "loss_reduction", "steps_per_epoch", "rank", "world_size")

# Opacus' PrivacyEngine keywords lazydp does not take, and what to do instead.
_OPACUS_ONLY = {
    "poisson_sampling": "lazydp samples with Poisson by default (sampler='poisson'); "
    "poisson_sampling=False is sampler='shuffle' (fixed-size batches, accounted without "
    "amplification).",
    "clipping": "lazydp clips flat (one bound C on each example's whole gradient, Opacus' "
    "clipping='flat'); per-layer, adaptive and automatic clipping are not supported.",
    "grad_sample_mode": "lazydp chooses the per-example machinery with mode=: 'dpsgd_b' "
    "materialises per-example gradients (Opacus' 'hooks' / 'functorch'), 'dpsgd_f' and "
    "'lazydp' use ghost norms (Opacus' 'ghost'; no criterion wrapper needed).",
    "criterion": "lazydp's ghost norms need no loss wrapper: compute the loss as usual and "
    "pass loss_reduction='mean' or 'sum' to match it.",
    "noise_generator": "The noise is seeded from OS entropy; for a reproducible research run "
    "pass PrivacyEngine(seed=...).",
    "secure_mode": "lazydp's CPU noise is always drawn from AES-128-CTR uniforms, seeded from OS "
    "entropy unless PrivacyEngine(seed=...) asks for a reproducible run (CUDA draws use torch's "
    "Philox kernel).",
    "batch_first": "lazydp takes each layer's first dimension as the batch; feed layers "
    "batch-first (a time-major input with fewer steps than examples is warned about and "
    "flagged in the privacy report, not refused).",
    "wrap_model": "lazydp captures the model's layers in place and returns the same module.",
    "rand_on_empty": "An empty Poisson batch still steps: it is charged and its noise is drawn.",
    # Not Opacus-only, but make_private_with_epsilon chooses it (a TypeError after calibrating).
    "noise_multiplier": "make_private_with_epsilon calibrates the noise multiplier to "
    "target_epsilon; to choose it yourself, call make_private.",
}


def _refuse_unknown(call: str, unknown: dict[str, Any]) -> None:
    """ConfigError for a keyword lazydp does not take: an Opacus one (a migrating user's
    first call) gets what to do instead, which a bare TypeError never said."""
    for key in unknown:
        advice = _OPACUS_ONLY.get(
            key, "Check its spelling against the signature (help(PrivacyEngine))."
        )
        raise ConfigError(f"{call}() does not take {key}={unknown[key]!r}. {advice}")


def _earlier_ledger(module: nn.Module, ledger: PrivacyLedger) -> tuple[str, int] | None:
    """(where, charged steps) of the ledger another engine of this process charged for training
    ``module`` -- or a module inside it: a detached model under a new head -- privately, unless
    it is ``ledger``'s file (the one that charged most if several); None when there is none."""
    found: PrivacyLedger | None = None
    for part in module.modules():
        earlier = _LEDGER_OF.get(part)
        if earlier is None or earlier is ledger or earlier.steps == 0:
            continue
        if earlier.path is not None and ledger.path is not None:
            if earlier.path.resolve() == ledger.path.resolve():
                continue  # the same ledger file: its charges carry over
        if found is None or earlier.steps > found.steps:
            found = earlier
    if found is None:
        return None
    return (str(found.path) if found.path is not None else "in memory", found.steps)


def _earlier_text(where: str, steps: int, ledger: PrivacyLedger) -> str:
    """Why a model trained before under another ledger releases more than this one says."""
    here = str(ledger.path) if ledger.path is not None else "in memory"
    advice = (
        f"pass ledger_path={where!r} to count them together"
        if where != "in memory"
        else "pass the same ledger_path to both engines to count them together"
    )
    return (
        f"this model was trained privately before by another PrivacyEngine, whose ledger "
        f"({where}) charged {steps} step(s); this engine's ledger ({here}) does not count them, "
        "so its epsilon understates the released model's: that is the composition of both "
        f"runs. To fine-tune, {advice}."
    )


def seeded_root(seed: int | None, charged: int) -> GaussianNoise:
    """A new run's root stream when its ledger already holds ``charged`` steps.

    A seeded run on a ledger with charged steps (a restart without a checkpoint, another run
    on the same ledger) starts where a resume at that ledger would (``_rekey_noise``): on
    stream 0 it would redraw the noise of the run that charged them -- on other batches,
    data or settings -- while the ledger counts both runs' steps as fresh noise, so the two
    released models would differ by noiseless gradients (DP invariant 5). A first run
    (empty ledger) keeps stream 0, so seeded runs still reproduce."""
    noise = GaussianNoise(seed=seed, stream=0)
    if seed is not None and charged:
        noise.rekey_(seed, [1 + charged])
    return noise
