"""Per-example gradient norms and clipped sums, one file per layer kind.

Importing this package registers every built-in clipper (Linear, Embedding, EmbeddingBag,
LayerNorm) and the torch.func fallback; ``clipper_for(module)`` then answers for any leaf layer.
The contract every clipper fulfils is in ``_base.py``; ``materialised.py`` holds the generic
helpers of the materialised (``dpsgd_b``) path.
"""

# Imported for their registration side effect (order is irrelevant: lookup is by type).
from lazydp.clipping import embedding, embedding_bag, fallback, layernorm, linear  # noqa: E402, F401, I001
from lazydp.clipping._base import (
    Call,
    ClippedSum,
    LayerClipper,
    PerSample,
    PerSampleRows,
    SparseRows,
    trainable_direct_params,
)
from lazydp.clipping.materialised import per_sample_clipped_sum, per_sample_norms2  # noqa: E402
from lazydp.clipping.registry import (
    clipper_for,
    parameterised_leaves,
    refuse_layers,
    register_clipper,
    register_fallback,
)

__all__ = [
    "Call",
    "ClippedSum",
    "LayerClipper",
    "PerSample",
    "PerSampleRows",
    "SparseRows",
    "clipper_for",
    "parameterised_leaves",
    "per_sample_clipped_sum",
    "per_sample_norms2",
    "refuse_layers",
    "register_clipper",
    "register_fallback",
    "trainable_direct_params",
]
