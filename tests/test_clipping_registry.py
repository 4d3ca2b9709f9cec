"""Registry: lookup by type and MRO, refusals before training, mixed parents, custom registration."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lazydp.clipping import LayerClipper, clipper_for, parameterised_leaves, register_clipper
from lazydp.clipping.embedding_bag import EmbeddingBagClipper
from lazydp.clipping.fallback import FallbackClipper
from lazydp.clipping.linear import LinearClipper
from lazydp.errors import UnsupportedLayerError


class PlainLinear(nn.Linear):
    """Same forward as nn.Linear: inherits the Linear clipper."""


class LoRALinear(nn.Linear):
    """Changes the forward: the Linear formulas no longer hold, so it must go to the fallback."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.inner = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * self.scale


def test_lookup_exact_type_then_mro_only_when_forward_is_inherited() -> None:
    assert isinstance(clipper_for(nn.Linear(2, 2)), LinearClipper)
    assert isinstance(clipper_for(PlainLinear(2, 2)), LinearClipper)
    assert isinstance(clipper_for(LoRALinear(2, 2)), FallbackClipper)
    assert isinstance(clipper_for(nn.EmbeddingBag(3, 2)), EmbeddingBagClipper)
    assert isinstance(clipper_for(nn.Conv1d(1, 1, 1)), FallbackClipper)


@pytest.mark.parametrize(
    "layer", [nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3)]
)
def test_batchnorm_is_refused_with_alternative(layer) -> None:
    with pytest.raises(
        UnsupportedLayerError, match=r"BatchNorm.*mixes examples.*use GroupNorm or LayerNorm"
    ):
        clipper_for(layer)


def test_subclass_of_refused_layer_is_refused() -> None:
    class MyBN(nn.BatchNorm1d):
        pass

    with pytest.raises(UnsupportedLayerError, match="MyBN is not supported"):
        clipper_for(MyBN(2))


def test_multihead_attention_is_refused_with_what_to_write_instead() -> None:
    """The generic advice (move the direct parameters into a child module) cannot be followed
    for torch's own layer, which nn.TransformerEncoderLayer users meet too."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.raises(
        UnsupportedLayerError,
        match=r"MultiheadAttention 'self_attn' .*TransformerEncoderLayer.*in_proj_weight.*"
        r"nn\.Linear layers.*scaled_dot_product_attention",
    ):
        parameterised_leaves(layer)


def test_mixed_parent_is_refused_and_leaves_are_listed() -> None:
    with pytest.raises(
        UnsupportedLayerError,
        match=r"Mixed owns trainable parameters \['scale'\].*inner.weight.*whose forward uses them",
    ):
        clipper_for(Mixed())
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Embedding(4, 2)))
    assert [(n, type(m)) for n, m in parameterised_leaves(model)] == [
        ("0", nn.Linear),
        ("2.0", nn.Embedding),
    ]
    with pytest.raises(UnsupportedLayerError, match=r"Mixed '1' owns"):
        parameterised_leaves(nn.Sequential(nn.Linear(2, 2), Mixed()))


def test_frozen_children_do_not_make_a_parent_mixed() -> None:
    model = Mixed()
    model.inner.requires_grad_(False)
    assert [n for n, _ in parameterised_leaves(model)] == [""]
    model.scale.requires_grad_(False)
    assert parameterised_leaves(model) == []


def test_register_clipper_for_a_custom_layer() -> None:
    class Doubler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

    @register_clipper(Doubler)
    class DoublerClipper(LayerClipper):
        pass

    assert DoublerClipper.layer_types == (Doubler,)
    assert isinstance(clipper_for(Doubler()), DoublerClipper)


@pytest.mark.parametrize(
    "bn", [nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3).requires_grad_(False)]
)
def test_batchnorm_without_trainable_parameters_is_refused_too(bn) -> None:
    # In train mode it still normalises each example by the others: removing one example
    # would move the others' gradients, past the clip bound (an audit measured 3.4x C).
    model = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 1))
    with pytest.raises(UnsupportedLayerError, match=r"BatchNorm1d '1' is not supported"):
        parameterised_leaves(model)


@pytest.mark.parametrize(
    "bn",
    [
        lambda: nn.LazyBatchNorm1d(affine=False, track_running_stats=False),
        lambda: nn.LazyBatchNorm1d(affine=False),
        lambda: nn.LazyBatchNorm2d(),
    ],
)
def test_lazy_batchnorm_is_refused_before_it_becomes_batchnorm(bn) -> None:
    # A lazy BatchNorm is no BatchNorm1d until its first forward (then its class changes), so
    # a refusal of BatchNorm1d alone let it mix examples and release running statistics.
    model = nn.Sequential(nn.Linear(3, 3), bn(), nn.Linear(3, 1))
    with pytest.raises(UnsupportedLayerError, match=r"LazyBatchNorm\dd( '1')? is not supported"):
        for _, layer in parameterised_leaves(model):
            clipper_for(layer)


@pytest.mark.parametrize("affine", [False, True])
def test_instancenorm_with_running_stats_is_refused(affine) -> None:
    # Per example in its forward, but its running statistics are averaged over the training
    # batch and released in state_dict() without noise: refused at make_private.
    norm = nn.InstanceNorm1d(3, affine=affine, track_running_stats=True)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), norm, nn.Flatten(), nn.Linear(9, 1))
    with pytest.raises(UnsupportedLayerError, match=r"InstanceNorm1d '1'.*track_running_stats"):
        parameterised_leaves(model)
    with pytest.raises(UnsupportedLayerError, match=r"track_running_stats=False"):
        clipper_for(norm)
    # Without running statistics it is per example and stays supported (fallback if affine).
    plain = nn.Sequential(nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, affine=affine))
    assert [n for n, _ in parameterised_leaves(plain)] == (["0", "1"] if affine else ["0"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: torch.nn.utils.parametrizations.weight_norm(m),
        lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
        lambda m: torch.nn.utils.weight_norm(m),
        lambda m: torch.nn.utils.spectral_norm(m),
        lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_a_parametrized_weight_is_refused_with_what_to_do(wrap, bias) -> None:
    # Was refused only at the step, as "layers saw different batch sizes", a mixed parent, or a
    # gradient from outside the layer (a tied weight): none says what is wrong.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the older weight_norm is deprecated
        model = nn.Sequential(wrap(nn.Linear(3, 4, bias=bias)), nn.Linear(4, 1))
    with pytest.raises(UnsupportedLayerError, match=r"Linear '0' has a parametrized weight"):
        parameterised_leaves(model)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: torch.nn.utils.parametrizations.weight_norm(m),
        lambda m: torch.nn.utils.parametrizations.orthogonal(m),
        lambda m: torch.nn.utils.weight_norm(m),
        lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5),
    ],
)
def test_a_frozen_parametrized_layer_under_a_trained_head_is_not_refused(wrap) -> None:
    # Nothing of it trains (a pruned or weight-normed pretrained backbone, a private linear
    # probe on top): it was refused like a trained one.
    import warnings

    from lazydp import PrivacyEngine
    from tests.toy import loader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the older weight_norm is deprecated
        model = nn.Sequential(wrap(nn.Linear(4, 4)), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    assert [n for n, _ in parameterised_leaves(model)] == ["1"]
    frozen = model[0].weight.detach().clone()
    engine = PrivacyEngine(seed=0)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model[1].parameters(), lr=0.1),
        data_loader=loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        mode="dpsgd_f",
    )
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    assert engine.ledger.steps == 1 and torch.equal(model[0].weight, frozen)
    # One of its parameters trainable again (a LoRA-style parametrization's own): refused.
    model[0].requires_grad_(True)
    with pytest.raises(UnsupportedLayerError, match="parametrized weight"):
        parameterised_leaves(model)
