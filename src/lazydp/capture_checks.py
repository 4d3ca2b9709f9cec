"""The refusals of a captured pass (capture.py): what makes a recorded forward/backward unusable.

``CaptureChecks`` is the part of ``CaptureSet`` that checks, at ``optimizer.step()`` before
anything is charged, that the recorded pass is one forward and one backward of this step whose
records clip exactly what autograd would have computed: finite values, the layers' own parameters
without gradient hooks, no gradient from outside a layer's calls, no input modified in place
after a layer read it, no second micro-batch (gradient accumulation), no backward reaching a
forgotten forward. Each message says what happened and what to do instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lazydp._dispatch import all_finite
from lazydp.errors import ConfigError, InputError

if TYPE_CHECKING:
    from lazydp.capture import LayerCapture


def user_hooks_text(layer: str, names: list[str]) -> str:
    return (
        f"parameter(s) {names} of layer {layer!r} carry gradient hooks (tensor.register_hook or "
        "register_post_accumulate_grad_hook). They would never run: lazydp computes each "
        "layer's clipped gradient sum from its inputs and output gradients, so autograd never "
        "forms these parameters' gradients, and a hook that scaled the released sum (g * 10) "
        "would break the clipping bound anyway. Freeze what should not train with "
        "requires_grad_(False), or put it in a parameter of its own; remove the hooks."
    )


class CaptureChecks:
    """Checks of the recorded pass, mixed into ``CaptureSet`` (which sets these attributes)."""

    layers: list[LayerCapture]
    outside_uses: set[str]
    lost: list[str]

    def _refuse_accumulation(self) -> None:
        raise ConfigError(
            "a training forward started after a backward whose gradients optimizer.step() "
            "has not used: lazydp clips each example within one forward/backward, so "
            "gradient accumulation over micro-batches is not supported. Use a larger "
            "batch (the sample rate sets it), call optimizer.step() after each backward "
            "(or optimizer.zero_grad() to drop it), and run evaluation forwards under "
            "torch.no_grad(). If the loop steps an optimizer, it must be the one "
            "make_private returned. Nothing was changed or charged."
        )

    def check_finite(self) -> None:
        """Refuse NaN/Inf before any parameter changes (clipping a NaN gives a NaN update)."""
        for layer in self.layers:
            for r in layer.records:
                bad = r.grad_output is not None and not bool(torch.isfinite(r.grad_output).all())
                for a in (*r.args, *r.kwargs.values()):
                    if isinstance(a, Tensor) and a.is_floating_point():
                        bad = bad or not bool(torch.isfinite(a).all())
                if bad:
                    raise InputError(self._non_finite_cause(layer.name))

    def _non_finite_cause(self, name: str) -> str:
        """Why NaN/Inf reached layer ``name``: the model's own parameters (an earlier update
        diverged) or, if they are all finite, the batch or the loss (only on this error path:
        it reads every parameter)."""
        broken = [
            f"{layer.name}.{pname}"
            for layer in self.layers
            for pname, p in layer.params().items()
            if not all_finite(p)  # a table: no table-sized temporary on this error path
        ]
        if broken:
            return (
                f"NaN or Inf reached layer {name!r}, and the model's parameters {broken[:3]} "
                "already hold NaN or Inf: an earlier update diverged. Lower the learning rate "
                "or max_grad_norm (the noise grows with it), and resume from a checkpoint taken "
                "before the divergence. No parameter was changed and nothing was charged to the "
                "privacy ledger."
            )
        return (
            f"NaN or Inf reached layer {name!r} (its input or its output gradient): check the "
            "batch's features and the loss. No parameter was changed and nothing was charged "
            "to the privacy ledger."
        )

    def check_layers_unchanged(self) -> None:
        """ConfigError if a captured layer's parameters were replaced after make_private, or
        got gradient hooks (see user_hooks_text). Replaced: a
        new nn.Parameter assigned (``layer.weight = nn.Parameter(w)``) is in no optimizer and
        would never train while the old one got noise alone; a parametrization (weight_norm,
        spectral_norm, register_parametrization, pruning) moves the weight out of the layer,
        and its step failed with a KeyError or as an "outside use"."""
        for layer in self.layers:
            if not layer.unchanged():
                raise ConfigError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) no longer holds the "
                    f"parameters {sorted(layer.owned)} it held at make_private: a new "
                    "nn.Parameter was assigned to it, or a parametrization (weight_norm, "
                    "spectral_norm, register_parametrization, pruning) was applied after "
                    "make_private. The optimizer and the per-example clipping hold the old "
                    "ones, so the new ones would not be trained. Write new values into the "
                    "existing parameter (with torch.no_grad(): layer.weight.copy_(w), or "
                    "model.load_state_dict(...)); parametrized weights are not supported (see "
                    "make_private's refusal). Nothing was changed or charged."
                )
            hooked = layer.hooked()
            if hooked:
                raise ConfigError(
                    f"{user_hooks_text(layer.name, hooked)} Nothing was changed or charged."
                )

    def check_no_outside_use(self) -> None:
        """ConfigError if the last backward reached a captured parameter outside its layer."""
        if self.outside_uses:
            names = sorted(self.outside_uses)
            raise ConfigError(
                f"parameter(s) {names} got a gradient from outside their own layer's forward "
                "(e.g. a tied output projection h @ emb.weight.T, or a penalty on the weights "
                "added to the loss). Per-example clipping sees each layer's own calls only, so "
                "that part of the gradient would escape clipping. Call the layer instead (an "
                "nn.Linear for the projection), use the optimizer's weight_decay for an L2 "
                "penalty, or freeze the parameter. Nothing was changed or charged."
            )

    def check_no_late_gradient(self) -> None:
        """ConfigError if a backward reached a layer call made after an earlier backward of
        this pass: two micro-batches' gradients, which would be clipped as one batch."""
        if any(
            r.late and r.grad_output is not None for layer in self.layers for r in layer.records
        ):
            self._refuse_accumulation()

    def check_inputs_unchanged(self) -> None:
        """InputError if a tensor a layer read was modified in place after the layer ran.

        The layers run with detached parameters, so autograd saves none of their inputs and
        cannot notice (plain PyTorch refuses such a backward); the clipper would compute the
        per-example gradients from the modified values."""
        for layer in self.layers:
            for r in layer.records:
                if not r.unchanged():
                    raise InputError(
                        f"an input of layer {layer.name!r} was modified in place after the layer "
                        "read it (e.g. h.mul_(...) or an in-place activation on a tensor a layer "
                        "had already consumed). lazydp computes each example's gradient at "
                        "optimizer.step() from the inputs the layers saw, so it would use the "
                        "modified values; plain PyTorch refuses this backward too. Make that "
                        "operation out of place (h = h * 10, ReLU(inplace=False)). Nothing was "
                        "changed or charged."
                    )

    def check_no_lost_gradient(self) -> None:
        """ConfigError if a backward reached records already forgotten: a forward a later
        training forward replaced (two forwards of the model before one backward), or one
        whose gradient zero_grad dropped or a step already used (a retained graph)."""
        if not self.lost:
            return
        if self.lost[0] == "zero_grad":
            what = (
                "whose gradient optimizer.zero_grad() dropped (a second backward through a "
                "retained graph after zero_grad()?): run a new forward after zero_grad()"
            )
        elif self.lost[0] == "step":
            what = (
                "that an earlier optimizer.step() already used (a second backward through a "
                "retained graph?): run a new forward for each step"
            )
        else:
            what = (
                "that a later training forward replaced: lazydp records one forward of the model "
                "per step, so the gradient of the first would be dropped. Run one forward per "
                "step (concatenate the views along dimension 1, or call the shared submodules "
                "inside one forward), and evaluation forwards under torch.no_grad()"
            )
        raise ConfigError(
            f"the backward reached a forward of the model {what}. Nothing was changed or charged."
        )
