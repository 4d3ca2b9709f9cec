"""Models: the LazyDP paper's DLRM workloads, and small MLP / tabular models."""

from lazydp.models.configs import (
    PAPER_CONFIGS,
    DLRMConfig,
    interaction_width,
    paper_config,
    table_bytes,
)
from lazydp.models.dlrm import DLRM
from lazydp.models.mlp import MLP, TabularModel, embedding_bag

__all__ = [
    "DLRM",
    "MLP",
    "PAPER_CONFIGS",
    "DLRMConfig",
    "TabularModel",
    "embedding_bag",
    "interaction_width",
    "paper_config",
    "table_bytes",
]
