"""Which clipper handles which layer: a registry filled by decorator, explicit refusals, a fallback.

Contract:
* ``clipper_for(module)`` returns the clipper registered for ``type(module)``, else for the nearest
  registered base class *whose forward the module does not override* (a subclass that changes the
  forward computes something else, so it goes to the exact torch.func fallback instead), else
  raises for refused layers (they mix examples across the batch), else returns the fallback.
  It always runs ``clipper.check(module)``, so an unsupported configuration raises here too.
* A layer must be a *leaf* in the parameter sense: a module owning trainable parameters directly
  must not also have children with trainable parameters (``parameterised_leaves`` and
  ``clipper_for`` raise UnsupportedLayerError for that mixed case).
* This module also holds the two small readers of captured calls every clipper uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lazydp._dispatch import cast
from lazydp.clipping._base import Call, LayerClipper, trainable_direct_params
from lazydp.errors import InputError, UnsupportedLayerError

_CLIPPERS: dict[type[nn.Module], LayerClipper] = {}
_REFUSALS: dict[type[nn.Module], str] = {}
_FALLBACK: list[LayerClipper] = []

C = TypeVar("C", bound=type[LayerClipper])


def register_clipper(*layer_types: type[nn.Module]) -> Callable[[C], C]:
    """Class decorator: instantiate the clipper once and register it for ``layer_types``.

    Example::

        @register_clipper(nn.Linear)
        class LinearClipper(LayerClipper): ...
    """
    if not layer_types:
        raise TypeError(
            "register_clipper needs at least one layer type, e.g. @register_clipper(nn.Linear)"
        )

    def decorate(cls: C) -> C:
        cls.layer_types = tuple(layer_types)
        instance = cls()
        for layer_type in layer_types:
            _CLIPPERS[layer_type] = instance
        return cls

    return decorate


def register_fallback(cls: C) -> C:
    """Class decorator: the clipper used for parameterised leaves with no registered clipper."""
    _FALLBACK[:] = [cls()]
    return cls


def refuse_layers(*layer_types: type[nn.Module], reason: str) -> None:
    """Declare layer types that have no exact per-example gradient; ``reason`` says what to use.

    Example::

        refuse_layers(nn.BatchNorm1d, reason="it mixes examples; use GroupNorm or LayerNorm")
    """
    for layer_type in layer_types:
        _REFUSALS[layer_type] = reason


refuse_layers(
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    # Not subclasses of the above (they only become BatchNorm1d/2d/3d at their first forward,
    # after make_private has looked at them): without these, LazyBatchNorm1d(affine=False)
    # mixed examples silently.
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    reason=(
        "batch normalisation mixes examples across the batch (each example's output depends on "
        "the others), so no per-example gradient exists, with or without trainable parameters; "
        "use GroupNorm or LayerNorm instead"
    ),
)


# Layers whose forward is per example but which, with track_running_stats=True, update their
# running statistics from the training batch: those buffers leave in state_dict() and steer
# every evaluation forward, with neither clipping nor noise (no parameter gradient shows it).
_RUNNING_STATS = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)


def _label(layer_type: type[nn.Module], name: str) -> str:
    """How a refusal names a layer: its class, and its name in the model where known."""
    return f"{layer_type.__name__} {name!r}" if name else layer_type.__name__


def _running_stats_refusal(module: nn.Module, name: str = "") -> None:
    """UnsupportedLayerError for an InstanceNorm that tracks running statistics."""
    if isinstance(module, _RUNNING_STATS) and module.track_running_stats:
        label = _label(type(module), name)
        raise UnsupportedLayerError(
            f"{label} with track_running_stats=True is not supported: in training it updates "
            "running_mean / running_var from the batch's examples, and those buffers are "
            "released (state_dict, evaluation forwards) without clipping or noise. Use "
            "track_running_stats=False (the default; evaluation then normalises each example "
            "by its own statistics, as training does)."
        )


def _parametrization_refusal(module: nn.Module, name: str = "") -> None:
    """UnsupportedLayerError for a layer whose weight is computed from other parameters
    outside its forward (torch.nn.utils.parametrize, or the weight_norm / spectral_norm / prune
    pre-hooks). Captured as is, its parameters' gradients either arrive outside the layer or
    reach a ParametrizationList "layer" whose output is the weight, not one row per example:
    it was refused only later, with a misleading message (batch sizes, a tied weight)."""
    hooks = module._forward_pre_hooks.values()
    if not (
        parametrize.is_parametrized(module)
        or any(isinstance(h, (WeightNorm, SpectralNorm, BasePruningMethod)) for h in hooks)
    ):
        return
    if not any(p.requires_grad for p in module.parameters()):
        # Frozen (a pruned or weight-normed pretrained backbone under a trained head): its
        # weight is computed without a gradient, and nothing of it is captured or updated.
        return
    label = _label(type(module), name)
    raise UnsupportedLayerError(
        f"{label} has a parametrized weight (torch.nn.utils.parametrize, e.g. "
        "parametrizations.weight_norm / spectral_norm / orthogonal, or the older weight_norm / "
        "spectral_norm, or torch.nn.utils.prune's mask): the weight is computed from other "
        "parameters outside the layer's forward, so lazydp cannot clip their per-example "
        "gradients. Remove the parametrization (parametrize.remove_parametrizations, "
        "remove_weight_norm, prune.remove), or compute "
        "the weight inside a custom layer's own forward from parameters it owns (the torch.func "
        "fallback then clips it exactly)."
    )


def clipper_for(module: nn.Module) -> LayerClipper:
    """The clipper for one parameterised leaf layer (already checked for unsupported settings).

    Example::

        >>> clipper_for(nn.Linear(3, 2)).layer_types
        (<class 'torch.nn.modules.linear.Linear'>,)
    """
    check_leaf(module)
    _running_stats_refusal(module)
    clipper = _lookup(type(module))
    clipper.check(module)
    return clipper


def _refusal(layer_type: type[nn.Module], name: str = "") -> None:
    """UnsupportedLayerError if ``layer_type`` (or a base class) is refused."""
    for base in layer_type.__mro__:
        if base in _REFUSALS:
            label = _label(layer_type, name)
            raise UnsupportedLayerError(f"{label} is not supported: {_REFUSALS[base]}")


def _lookup(layer_type: type[nn.Module]) -> LayerClipper:
    _refusal(layer_type)
    for base in layer_type.__mro__:
        # Only inherit a clipper when the forward is the registered one: the clipper's formulas
        # are derivatives of that exact forward.
        if base in _CLIPPERS and (base is layer_type or layer_type.forward is base.forward):
            return _CLIPPERS[base]
    if not _FALLBACK:
        raise UnsupportedLayerError(
            f"no clipper for {layer_type.__name__} and no fallback registered; import lazydp.clipping"
        )
    return _FALLBACK[0]


def check_leaf(module: nn.Module, name: str = "") -> None:
    """Raise UnsupportedLayerError if ``module`` owns trainable parameters *and* has children that do."""
    own = trainable_direct_params(module)
    if not own:
        return
    nested = [
        f"{child_name}.{p_name}"
        for child_name, child in module.named_children()
        for p_name, p in child.named_parameters()
        if p.requires_grad
    ]
    if nested:
        label = _label(type(module), name)
        if isinstance(module, nn.MultiheadAttention):
            # torch's own layer: "move the parameters into a child" cannot be done to it, and
            # nn.Transformer*Layer users meet it here too, so name what works instead.
            raise UnsupportedLayerError(
                f"{label} (also inside nn.TransformerEncoderLayer / DecoderLayer) keeps its q/k/v "
                f"projection as bare parameters {sorted(own)} used outside any leaf layer, so "
                "they have no per-example clipper; write the attention from nn.Linear layers "
                "(q, k, v and output projections, batch_first) and compute the scores with "
                "torch.nn.functional.scaled_dot_product_attention or softmax(q @ k.T): those "
                "layers' per-example norms are exact"
            )
        raise UnsupportedLayerError(
            f"{label} owns trainable parameters {sorted(own)} and also has children with trainable "
            f"parameters {nested[:3]}; per-example gradients are computed per leaf layer: move "
            "the direct parameters into their own small child module whose forward uses them "
            "(e.g. forward(self, h): return h + self.weight), called by the parent, or freeze them"
        )


def parameterised_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module that owns trainable parameters directly, in model order.

    Raises UnsupportedLayerError for a module that owns parameters and has parameterised children.

    Example::

        >>> [n for n, _ in parameterised_leaves(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))]
        ['0']
    """
    leaves = []
    owner: dict[int, str] = {}  # id(parameter) -> the layer that owns it
    for name, module in model.named_modules():
        params = trainable_direct_params(module)
        _running_stats_refusal(module, name)  # with or without trainable parameters
        _parametrization_refusal(module, name)
        if not params:
            # A refused layer mixes examples whether or not it trains: BatchNorm1d(affine=False)
            # or a frozen BatchNorm still normalises each example by the others in train mode,
            # so one example would move every other example's gradient (past the clip bound).
            _refusal(type(module), name)
        if params:
            check_leaf(module, name)
            leaves.append((name, module))
        for pname, p in params.items():
            if id(p) in owner:
                # Each layer's norm and clipped sum is computed on its own; a weight shared by
                # two layers would need the cross terms of both in one norm, and its two sums
                # added. Neither is done, so it is refused rather than clipped wrongly.
                raise UnsupportedLayerError(
                    f"layers {owner[id(p)]!r} and {name!r} share one parameter ({pname!r}), e.g. "
                    "tied input and output embeddings; per-example clipping of a tied weight is "
                    "not supported. Untie them (give each layer its own weight), or call the "
                    "one layer twice instead of sharing its weight with another layer."
                )
            owner[id(p)] = name or type(module).__name__
    return leaves


def call_arg(
    call_args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: Any = None
) -> Any:
    """Argument ``name`` of a captured forward call, passed positionally at ``pos`` or by keyword."""
    if len(call_args) > pos:
        return call_args[pos]
    return kwargs.get(name, default)


def batch_size(calls: list[Call]) -> int:
    """The batch size shared by all calls (dimension 0 of grad_output); InputError if they differ."""
    if not calls:
        raise InputError("calls is empty; a clipper needs at least one captured forward call")
    sizes = {int(call.grad_output.shape[0]) for call in calls}
    if len(sizes) != 1:
        raise InputError(
            f"calls have different batch sizes {sorted(sizes)}; every call of a layer in one step "
            "must see the same batch (dimension 0 is the example)"
        )
    return sizes.pop()


def clip_factors(c: Tensor, batch: int, like: Tensor) -> Tensor:
    """Validate the per-example clip factors ``c`` (shape (B,)) and cast them to ``like``'s dtype."""
    if c.shape != (batch,):
        raise InputError(
            f"c has shape {tuple(c.shape)}; expected ({batch},), one clip factor per example"
        )
    return cast(c, like.dtype, like.device)
