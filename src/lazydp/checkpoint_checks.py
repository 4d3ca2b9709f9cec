"""The checks a checkpoint passes before ``PrivacyEngine.load_checkpoint`` changes anything.

A checkpoint is refused (PrivacyError, nothing loaded) unless every part of it fits the engine
loading it: taken after no more charged steps than the ledger holds (an epsilon is never
lowered by a resume), written in the same mode, with LazyDP's pending noise owed at this
engine's sigma * C / B, for this model's keys and shapes, these optimizers, and a sampler
position this loader can continue (a shuffled epoch must neither restart nor change its
settings midway). ``CheckpointChecks`` is mixed into ``PrivacyEngine`` (engine.py).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from lazydp.errors import ConfigError, PrivacyError
from lazydp.loader import check_replay
from lazydp.noise import GaussianNoise
from lazydp.optim.dp_optimizer import PrivacyParams


def _lazy_noise(privacy: dict[str, Any]) -> float | None:
    """sigma * C / B_expected of saved privacy settings: the std per unit lr of one step's
    pending noise on a row (None when the settings are damaged)."""
    try:
        params = PrivacyParams(**privacy)
        return params.noise_std / float(params.expected_batch_size)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


class CheckpointChecks:
    """The checkpoint checks of ``PrivacyEngine`` (which defines what they read)."""

    module: Any
    privacy: PrivacyParams | None
    capture: Any
    ledger: Any
    optimizer: Any
    noise: GaussianNoise | None
    _no_flush: Callable[[], AbstractContextManager[None]]  # state_dict without the flush
    _dp_sampler: Callable[[], Any]  # the private loader's sampler, or None

    def _check_checkpoint(self, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
        """PrivacyError unless every part of ``state`` fits this engine (changes nothing)."""
        assert self.module is not None and self.privacy is not None
        if self.capture is not None and self.capture.has_backward():
            raise PrivacyError(
                f"load_checkpoint({path}) between loss.backward() and optimizer.step(): that "
                "gradient belongs to the weights the checkpoint would replace, and the next "
                "step would apply it to the loaded ones. Call optimizer.zero_grad() first (or "
                "step, then load). Nothing was loaded."
            )
        charged = state.get("ledger_steps")
        if isinstance(charged, bool) or not isinstance(charged, int) or charged < 0:
            raise PrivacyError(f"checkpoint {path} has no valid ledger_steps; it is damaged.")
        if self.ledger.steps < charged:
            raise PrivacyError(
                f"checkpoint {path} was taken after {state['ledger_steps']} charged steps but the "
                f"privacy ledger holds {self.ledger.steps}; refusing to resume with a lower "
                "epsilon. Restore the ledger file that belongs to this run."
            )
        saved = state.get("privacy")
        if not isinstance(saved, dict):
            raise PrivacyError(f"checkpoint {path} has no privacy settings; it is damaged.")
        mode = saved.get("mode")
        if mode != self.privacy.mode:
            # A lazydp checkpoint's weights owe the noise its history records; an eager engine
            # would never add it (and a lazy one has no history for an eager checkpoint).
            raise PrivacyError(
                f"checkpoint {path} was written in mode {mode!r}, this engine runs "
                f"{self.privacy.mode!r}; resume in the mode that wrote it. Nothing was loaded."
            )
        owed = _lazy_noise(saved)
        mine_std = self.privacy.noise_std / self.privacy.expected_batch_size
        if mode == "lazydp" and (owed is None or not math.isclose(owed, mine_std, rel_tol=1e-12)):
            raise PrivacyError(
                f"checkpoint {path}'s pending LazyDP noise was owed at sigma*C/B = "
                f"{'(damaged)' if owed is None else f'{owed:.6g}'} per unit lr, this engine "
                f"draws it at {mine_std:.6g}; resume with the noise multiplier, "
                "max_grad_norm and batch size that wrote it (or resume in that setting and "
                "export the flushed model to start a new run). Nothing was loaded."
            )
        with self._no_flush():
            mine = self.module.state_dict()
        model = state.get("model")
        if not isinstance(model, dict) or set(model) != set(mine):
            raise PrivacyError(
                f"checkpoint {path} holds the state of another model (its keys differ from this "
                "model's state_dict). Nothing was loaded."
            )
        for key, t in mine.items():
            if not isinstance(model[key], torch.Tensor) or model[key].shape != t.shape:
                raise PrivacyError(
                    f"checkpoint {path}: {key!r} has shape "
                    f"{tuple(getattr(model[key], 'shape', ()))}, the model's is {tuple(t.shape)}. "
                    "Nothing was loaded."
                )
        if self.optimizer is not None:
            kinds = [type(o).__name__ for o in self.optimizer.originals]
            saved_kinds = state.get("optimizer_kinds", kinds)  # absent in older checkpoints
            if saved_kinds != kinds:
                # torch would load one kind's groups into another and fail in the next step,
                # after its charge (SGD reading Adam's groups: KeyError 'momentum').
                raise PrivacyError(
                    f"checkpoint {path} was written by optimizers {saved_kinds}, this engine "
                    f"wraps {kinds}; resume with the optimizers that wrote it. Nothing was loaded."
                )
            self.optimizer.check_state_dicts(state.get("optimizer"), state.get("lazy"))
        if self.noise is not None and "noise" in state:
            GaussianNoise._from_state(state["noise"], self.noise.threads)  # validates only
        self._check_sampler_state(state.get("sampler"), path)
        self._check_shuffle_settings(saved, state.get("sampler"), path)

    def _check_shuffle_settings(
        self, saved: dict[str, Any], sampler: Any, path: str | os.PathLike[str]
    ) -> None:
        """A shuffled epoch is charged as one Gaussian release per setting, which holds only if
        each setting's steps start at an epoch boundary: refuse changing sigma or q mid-epoch
        (an example in a batch of both halves would have been released twice)."""
        assert self.privacy is not None
        if self.privacy.sampler != "shuffle" or not isinstance(sampler, dict):
            return
        changed = any(
            saved.get(k) != getattr(self.privacy, k) for k in ("noise_multiplier", "sample_rate")
        )
        if changed and int(sampler.get("position", 0)) > 0:
            raise PrivacyError(
                f"checkpoint {path} stopped in the middle of a shuffled epoch with noise "
                f"multiplier {saved.get('noise_multiplier')} and sample rate "
                f"{saved.get('sample_rate')}; this run uses {self.privacy.noise_multiplier} and "
                f"{self.privacy.sample_rate}. Shuffled epochs are accounted per setting from an "
                "epoch boundary, so finish the epoch with the settings that started it, then "
                "change them. Nothing was loaded."
            )

    def _check_sampler_state(self, saved: Any, path: str | os.PathLike[str]) -> None:
        """The loader's epoch position must resume too: a shuffled epoch restarted from its
        first batch would use some examples twice in one epoch, which its accounting (each
        example once per epoch) does not charge for."""
        sampler = self._dp_sampler()
        if sampler is None:
            return
        if saved is None:
            if sampler.name == "shuffle":
                raise PrivacyError(
                    f"checkpoint {path} has no sampler position (an older lazydp wrote it); a "
                    "shuffled epoch would restart and reuse examples its accounting counts "
                    "once. Finish that run with the lazydp version that started it, or start a "
                    "new run. Nothing was loaded."
                )
            return  # Poisson steps are independent: only the step counter is lost
        try:
            restored = copy.deepcopy(sampler)
            restored.load_state_dict(saved)
            if sampler.name == "shuffle":
                check_replay(saved.get("replay", []), restored)
            elif saved.get("replay"):
                raise ConfigError("a Poisson sampler state has replayed batches")
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise PrivacyError(
                f"checkpoint {path}'s sampler position does not fit this loader ({exc}); resume "
                "with the data, batch size and sampler that wrote it. Nothing was loaded."
            ) from None
