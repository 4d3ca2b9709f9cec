"""DLRM: bottom MLP on dense features, one EmbeddingBag per sparse feature, dot interaction, top MLP.

Contract:
* ``forward(dense (B, num_dense), sparse)`` returns logits of shape (B,) (no sigmoid). ``sparse``
  holds one entry per table, either ``(ids, offsets)`` (flat int64 ids and (B,) bag starts, the
  EmbeddingBag 1-D form) or a (B, L) int64 tensor (L ids per bag). Both reach the table unchanged.
* No layer mixes examples (no BatchNorm): logit i depends on example i only.
* Tables are created without Python loops over rows (see ``mlp.embedding_bag``): a 2 GB model
  starts in about a second on two cores.
* ``table_device`` puts the tables apart from the MLPs (``device``): the LazyDP paper keeps the
  tables in host memory and the MLPs on the GPU. Ids are then read on the tables' device and the
  pooled rows move to the MLPs' (autograd moves their gradients back).
* With ``check_ids=True`` (default) ids outside a table raise ``InputError`` naming the table;
  that costs a min/max per table (and a device sync on GPUs, where benchmarks may turn it off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lazydp.errors import ConfigError, InputError
from lazydp.models.configs import DLRMConfig, interaction_width
from lazydp.models.mlp import MLP, embedding_bag, resolve_seed

SparseInput = tuple[Tensor, Tensor] | Tensor


class DLRM(nn.Module):
    """The DLRM of the LazyDP paper's workloads.

    Example::

        cfg = paper_config("rmc1", scale=1e-6)
        model = DLRM.from_config(cfg, seed=0)
        logits = model(torch.zeros(4, 13), [torch.zeros(4, 80, dtype=torch.long)] * 10)
        assert logits.shape == (4,)
    """

    _tril_rows: Tensor  # buffers: row/col indices of the strictly lower triangle of (n, n)
    _tril_cols: Tensor

    def __init__(
        self,
        table_rows: Sequence[int],
        embedding_dim: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        *,
        mode: str = "sum",
        sparse: bool = False,
        seed: int | None = None,
        device: torch.device | str | None = None,
        table_device: torch.device | str | None = None,
        check_ids: bool = True,
    ) -> None:
        super().__init__()
        if not table_rows:
            raise ConfigError("table_rows is empty; a DLRM needs at least one embedding table")
        if len(bottom_mlp) < 2 or bottom_mlp[-1] != embedding_dim:
            raise ConfigError(
                f"bottom_mlp={tuple(bottom_mlp)} must end in embedding_dim={embedding_dim} "
                "so its output can meet the embeddings in the dot interaction"
            )
        if not top_mlp or top_mlp[-1] != 1:
            raise ConfigError(f"top_mlp={tuple(top_mlp)} must end in 1 (one logit)")
        base = resolve_seed(seed)
        self.table_rows = tuple(int(r) for r in table_rows)
        # Tables apart from the MLPs (the paper's GPU set-up): only then does a forward move
        # ids to the tables and pooled rows to the MLPs (the step's hot path pays nothing else).
        self._apart = table_device is not None and torch.device(table_device) != torch.device(
            device if device is not None else table_device
        )
        self.embedding_dim = embedding_dim
        self.check_ids = check_ids
        self.bottom = MLP(
            bottom_mlp[0], bottom_mlp[1:-1], embedding_dim, final_relu=True, seed=base
        )
        self.embeddings = nn.ModuleList(
            embedding_bag(
                rows,
                embedding_dim,
                mode=mode,
                sparse=sparse,
                seed=base + 2 + t,
                device=device if table_device is None else table_device,
            )
            for t, rows in enumerate(self.table_rows)
        )
        width = interaction_width(len(self.table_rows), embedding_dim)
        self.top = MLP(width, top_mlp[:-1], 1, seed=base + 1)
        n = len(self.table_rows) + 1
        tril = torch.tril_indices(n, n, offset=-1)
        # Buffers (not parameters) so .to(device) moves them; not saved in state_dict.
        self.register_buffer("_tril_rows", tril[0], persistent=False)
        self.register_buffer("_tril_cols", tril[1], persistent=False)
        if device is not None:  # the tables were born where they stay: move the rest
            for part in (self.bottom, self.top):
                part.to(device)
            self._tril_rows = self._tril_rows.to(device)
            self._tril_cols = self._tril_cols.to(device)

    @classmethod
    def from_config(
        cls,
        cfg: DLRMConfig,
        *,
        mode: str = "sum",
        sparse: bool = False,
        seed: int | None = None,
        device: torch.device | str | None = None,
        table_device: torch.device | str | None = None,
        check_ids: bool = True,
    ) -> DLRM:
        """Build the DLRM described by ``cfg`` (see ``paper_config``).

        Example: ``DLRM.from_config(paper_config("basic", scale=1e-6), seed=0)``.
        """
        return cls(
            cfg.table_rows,
            cfg.embedding_dim,
            cfg.bottom_mlp,
            cfg.top_mlp,
            mode=mode,
            sparse=sparse,
            seed=seed,
            device=device,
            table_device=table_device,
            check_ids=check_ids,
        )

    def interact(self, bottom_out: Tensor, pooled: Sequence[Tensor]) -> Tensor:
        """Dot interaction: [bottom_out, strictly-lower-triangle of T T^T] for T = (B, n, d)."""
        vectors = torch.stack([bottom_out, *pooled], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))
        return torch.cat([bottom_out, dots[:, self._tril_rows, self._tril_cols]], dim=1)

    def forward(self, dense: Tensor, sparse: Sequence[SparseInput]) -> Tensor:
        if dense.dim() != 2 or dense.shape[1] != self.bottom.in_features:
            raise InputError(
                f"dense has shape {tuple(dense.shape)}; expected (batch, {self.bottom.in_features})"
            )
        if len(sparse) != len(self.embeddings):
            raise InputError(
                f"sparse has {len(sparse)} entries; the model has {len(self.embeddings)} tables"
            )
        batch = dense.shape[0]
        pooled = [
            self._lookup(t, bag, entry, batch)
            for t, (bag, entry) in enumerate(zip(self.embeddings, sparse))
        ]
        if self._apart:
            pooled = [p.to(dense.device, non_blocking=True) for p in pooled]
        return self.top(self.interact(self.bottom(dense), pooled)).squeeze(1)

    def _lookup(self, table: int, bag: nn.Module, entry: SparseInput, batch: int) -> Tensor:
        if isinstance(entry, Tensor):
            ids, offsets = entry, None
            if ids.dim() != 2 or ids.shape[0] != batch:
                raise InputError(
                    f"sparse[{table}] has shape {tuple(ids.shape)}; expected (batch={batch}, ids "
                    "per bag) or an (ids, offsets) pair"
                )
        else:
            ids, offsets = entry
            if ids.dim() != 1 or offsets.dim() != 1 or offsets.shape[0] != batch:
                raise InputError(
                    f"sparse[{table}] = (ids {tuple(ids.shape)}, offsets {tuple(offsets.shape)}); "
                    f"expected flat ids and offsets of shape ({batch},)"
                )
        if self.check_ids and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            rows = self.table_rows[table]
            if low < 0 or high >= rows:
                raise InputError(
                    f"sparse[{table}] has ids in [{low}, {high}] but table {table} has {rows} "
                    f"rows; ids must lie in [0, {rows - 1}]"
                )
        if self._apart:
            weight = bag.weight
            assert isinstance(weight, Tensor)
            where = weight.device
            ids, offsets = ids.to(where), None if offsets is None else offsets.to(where)
        return bag(ids, offsets)
