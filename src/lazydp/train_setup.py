"""What a ``lazydp train`` run settles before its first step: data, privacy plan, model, ledger.

``plan_run`` opens the data and fixes the steps, delta and noise multiplier (calibrated to the
target epsilon, with what preprocessing spent taken off first); ``model_and_optimizers`` builds
the model from its spec (report.json records it, so ``load_trained`` can rebuild it) with the
tables in their own SGD; ``open_engine`` refuses a ledger that does not fit the request (a ledger
is never reset). Memory and disk are checked here too, before any privacy is spent. The loop is
in training.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lazydp import _validate as v
from lazydp.accounting import (
    calibrate_noise_multiplier,
    default_delta,
    epoch_steps,
    steps_for_epochs,
)
from lazydp.engine import PrivacyEngine
from lazydp.errors import ConfigError, DataError, PrivacyError
from lazydp.ledger import PrivacyLedger, ledger_path
from lazydp.report import steps_text
from lazydp.train_config import TrainConfig


class RowsDataset(Dataset):
    """Map-style view of a ParquetDataset; whole batches are fetched in one call."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return int(self.ds.num_rows)

    def __getitem__(self, i: int) -> Any:
        return self.ds.batch([i])

    def __getitems__(self, indices: list[int]) -> Any:
        return self.ds.batch(np.asarray(indices, dtype=np.int64))


def identity_collate(batch: Any) -> Any:
    return batch


def _open_data(cfg: TrainConfig) -> tuple[Path, Any, Any, dict[str, Any], str]:
    """(root, train, test, metadata, digest of metadata.json): the digest names the data's
    preprocessing charge in the ledger (``charge_preprocessing``)."""
    from lazydp.data.parquet import ParquetDataset

    if cfg.data:
        root = Path(cfg.data)
    else:
        from lazydp.data.real import load_builtin

        v.check_choice("dataset", cfg.dataset, ("movielens", "acs"))
        root = Path(load_builtin(cfg.dataset))
    train = ParquetDataset(root, split="train")
    test = ParquetDataset(root, split="test")
    return root, train, test, train.metadata, _digest_of(root, train.metadata, test.metadata)


def _digest_of(root: Path, train_meta: dict[str, Any], test_meta: dict[str, Any]) -> str:
    """The digest of ``root/metadata.json``, read after both splits opened; DataError unless
    it is the metadata they read. A `lazydp preprocess --overwrite` of ``root`` landing while
    the run set up (another DP vocabulary) had the ledger charge the old data's cost under the
    new data's name, so a --resume on the new data passed as already paid for."""
    try:
        text = (root / "metadata.json").read_bytes()
        same = json.loads(text) == train_meta == test_meta
    except (OSError, ValueError):
        same = False
    if not same:
        raise DataError(
            f"{root} changed while this run opened it (preprocessed again, e.g. with "
            "--overwrite?): the splits and metadata.json no longer belong together. Wait for "
            "that preprocessing to finish and start the run again. Nothing was charged."
        )
    return hashlib.sha256(text).hexdigest()[:16]


class _Tabular(nn.Module):
    """Categorical embeddings (one bag per feature) + dense features -> MLP; for census tables."""

    def __init__(self, table_rows: list[int], num_dense: int, dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(r, dim, mode="sum") for r in table_rows)
        layers: list[nn.Module] = []
        width = num_dense + dim * len(table_rows)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, dense: Tensor, sparse: list[tuple[Tensor, Tensor]]) -> Tensor:
        pooled = [emb(ids, offsets) for emb, (ids, offsets) in zip(self.embeddings, sparse)]
        return self.mlp(torch.cat([dense, *pooled], dim=1)).squeeze(1)


def check_model_fits(train: Any, cfg: TrainConfig) -> None:
    """ConfigError before any allocation when the tables (and what the mode keeps per row)
    would not fit in memory: never let the allocator fail deep in torch or the OS kill the run."""
    from lazydp.bench.memory import available_memory_bytes

    rows = sum(int(train.table_sizes[name]) for name in train.sparse_names)
    per_row = cfg.embedding_dim * 4 * (2 if cfg.momentum else 1)  # float32 row (+ velocity)
    per_row += 4 if cfg.mode == "lazydp" else 0  # its history table
    need, available = rows * per_row, available_memory_bytes()
    if available > 0 and need > 0.85 * available:
        raise ConfigError(
            f"the embedding tables need ~{need / 1e9:.3g} GB ({rows:,} rows x "
            f"--embedding-dim {cfg.embedding_dim}, float32"
            f"{', with a velocity per row (--momentum)' if cfg.momentum else ''}"
            f"{', plus the LazyDP history' if cfg.mode == 'lazydp' else ''}), and "
            f"{available / 1e9:.3g} GB is available (85% usable). Lower --embedding-dim, or "
            "preprocess with smaller vocabularies (they set each table's rows). Nothing was "
            "charged."
        )


#: Bytes a ledger line takes at most (a Poisson step is ~150, a shuffled one ~200).
LEDGER_LINE_BYTES = 256


def check_disk_fits(out: Path, model: nn.Module, cfg: TrainConfig, steps: int) -> None:
    """ConfigError before anything is charged when ``out``'s file system has too little free
    space for what the run must write: the ledger's lines, the final model.pt and, with
    --checkpoint-every, a checkpoint. Found at the end instead, the budget is spent and the
    trained model lost (a short run keeps no checkpoint to --resume from); found mid-run, the
    ledger's last line is torn."""
    import shutil

    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return  # cannot tell (an odd file system): the writes themselves report a full disk
    params = [(m, p) for m in model.modules() for p in m.parameters(recurse=False)]
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    table = (nn.Embedding, nn.EmbeddingBag)
    table_bytes = sum(p.numel() * p.element_size() for m, p in params if isinstance(m, table))
    dense_bytes = sum(p.numel() * p.element_size() for m, p in params if not isinstance(m, table))
    ledger_bytes = steps * LEDGER_LINE_BYTES
    checkpoint_bytes = 0
    if cfg.checkpoint_every:  # model, Adam's two moments, table velocity, LazyDP history
        rows = sum(p.shape[0] for m, p in params if isinstance(m, table))
        checkpoint_bytes = model_bytes + 2 * dense_bytes * (cfg.dense_optimizer == "adam")
        checkpoint_bytes += table_bytes * (cfg.momentum > 0) + 8 * rows * (cfg.mode == "lazydp")
    need = ledger_bytes + model_bytes + checkpoint_bytes
    if need > free:
        parts = (
            f"model.pt ~{model_bytes / 1e6:.3g} MB, the ledger up to {ledger_bytes / 1e6:.3g} MB"
        )
        parts += f" for {steps_text(steps)}"
        if checkpoint_bytes:
            parts += f", checkpoint.pt ~{checkpoint_bytes / 1e6:.3g} MB"
        raise ConfigError(
            f"--out {out} has {free / 1e6:.3g} MB free, but the run writes about "
            f"{need / 1e6:.3g} MB ({parts}). Free space or choose another --out. Nothing was "
            "charged."
        )


def model_spec(train: Any, cfg: TrainConfig, kind: str) -> dict[str, Any]:
    """What rebuilds the trained model (report.json's "model"; see :func:`load_trained`)."""
    sizes = [int(train.table_sizes[name]) for name in train.sparse_names]
    if kind != "acs" and not sizes:
        raise ConfigError(
            f"{train.root} has no categorical (id) columns: `lazydp train` trains a DLRM, which "
            "reads at least one embedding table. Preprocess with at least one categorical column, "
            "or train your own model on the data through the Python API (lazydp.PrivacyEngine). "
            "Nothing was charged."
        )
    return {
        "kind": kind,
        "table_rows": sizes,
        "num_dense": len(train.dense_names),
        "embedding_dim": cfg.embedding_dim,
        "hidden": list(cfg.hidden),
        "model_seed": cfg.model_seed,
    }


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The untrained model ``spec`` (from :func:`model_spec`) describes."""
    sizes, num_dense, d, hidden = (
        spec["table_rows"], spec["num_dense"], spec["embedding_dim"], spec["hidden"]
    )  # fmt: skip
    if spec["kind"] == "acs":
        return _Tabular(sizes, num_dense, d, hidden)
    from lazydp.models.dlrm import DLRM

    return DLRM(sizes, d, (max(num_dense, 1), *hidden, d), (*hidden, 1), seed=spec["model_seed"])


def _privacy_cost(meta: dict[str, Any], root: Path) -> dict[str, Any]:
    """What preprocessing spent, from metadata.json: checked, and never less than its recorded
    parameters say (a cost edited down would be charged low and handed to training)."""
    where = root / "metadata.json"

    def amount(x: Any, name: str) -> float:
        if x is None:
            return 0.0
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise DataError(
                f"{where}: {name} = {x!r} is not a finite number >= 0; the file is damaged. "
                "Preprocess the data again."
            )
        return float(x)

    cost = meta.get("privacy_cost") or {}
    params: dict[str, Any] = meta.get("parameters") or {}
    if not isinstance(params, dict):
        raise DataError(f"{where}: parameters is not an object; the file is damaged.")
    if not isinstance(cost, dict):
        raise DataError(f"{where}: privacy_cost is not an object; the file is damaged.")
    epsilon = amount(cost.get("epsilon"), "privacy_cost.epsilon")
    delta = amount(cost.get("delta"), "privacy_cost.delta")
    if params.get("vocabulary") == "dp":
        spent = amount(params.get("vocab_epsilon"), "parameters.vocab_epsilon")
        if spent <= 0:
            raise DataError(
                f"{where}: a DP vocabulary (parameters.vocabulary = 'dp') with no epsilon "
                "recorded; its cost cannot be charged. Preprocess the data again."
            )
        epsilon = max(epsilon, spent)
        delta = max(delta, amount(params.get("vocab_delta"), "parameters.vocab_delta"))
    return {**cost, "epsilon": epsilon, "delta": delta}


def charge_preprocessing(ledger: PrivacyLedger, cost: dict[str, Any], digest: str) -> None:
    """Charge the data's DP vocabulary once per run, named after its metadata.json; refuse a
    resume on other preprocessed data (its vocabulary would never be charged)."""
    name = f"preprocessing:{digest}"
    earlier = [c for c in ledger.external if c.name.startswith("preprocessing")]
    mine = [(float(cost["epsilon"]), float(cost.get("delta", 0.0)))] if cost.get("epsilon") else []
    if ledger.steps == 0 and not earlier:
        if mine:
            ledger.charge_external(name, *mine[0])
        return
    # Ledgers from before the digest was recorded name it "preprocessing": compare the cost.
    same = [(c.epsilon, c.delta) for c in earlier] == mine and all(
        c.name in (name, "preprocessing") for c in earlier
    )
    if not same:
        raise ConfigError(
            f"--resume on other preprocessed data: the run's ledger charged "
            f"{[(c.name, c.epsilon) for c in earlier] or 'no vocabulary'}, but --data "
            f"{'has a DP vocabulary of epsilon ' + str(mine[0][0]) if mine else 'has none'} "
            f"(metadata digest {digest}). Resume with the data the run started on, or start a "
            "new --out (a new vocabulary release must be charged)."
        )


def _left_for_training(asked: float, privacy_cost: dict[str, Any], kind: str, flag: str) -> float:
    """The ``kind`` ("epsilon" or "delta") left for training once preprocessing's is paid. Both
    add up under basic composition, so the run's whole guarantee holds at what was asked for
    (rounded down where float subtraction would let the sum exceed it)."""
    spent = float(privacy_cost.get(kind) or 0.0)
    if spent and asked - spent <= 0:
        raise ConfigError(
            f"{kind} {asked:g} is already spent by preprocessing ({kind} {spent:g}); the run's "
            f"guarantee would not fit in it. Raise {flag} or preprocess with a smaller "
            f"--vocab-{kind}."
        )
    left = asked - spent
    while left + spent > asked:
        left = math.nextafter(left, 0.0)
    return left


def check_out(out: Path) -> None:
    """Found now, not after the budget is spent: an output the run could not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (created if missing).")
    for name in ("model.pt", "report.json", "checkpoint.pt"):
        if (out / name).is_dir():
            raise ConfigError(
                f"{out / name} is a directory, so the run could not write its {name} after "
                "training. Move it away or choose another --out."
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out} is not writable; choose another directory.")


@dataclass
class RunPlan:
    """What a run trains on and what it may spend, settled before anything is built."""

    root: Path
    train: Any
    test: Any
    kind: str  # the model family: "acs" (census) or "dlrm"
    n: int  # training rows
    delta: float  # what is left for training after the preprocessing's share
    q: float  # sampling rate
    total_steps: int
    privacy_cost: dict[str, Any]  # the preprocessing's (privacy_cost in metadata.json)
    digest: str  # of that metadata.json: names the preprocessing charge
    sigma: float
    calibrated: bool  # sigma calibrated to --target-epsilon (not given)


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Open the data and settle the run's steps, delta and noise multiplier (calibrated to
    the target epsilon when none is given), with what preprocessing spent taken off first."""
    root, train, test, meta, digest = _open_data(cfg)
    kind = (
        "acs" if (cfg.dataset == "acs" and not cfg.data) or meta.get("format") == "acs" else "dlrm"
    )
    n = int(train.num_rows)
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    q = min(1.0, cfg.batch_size / n)
    # An epoch as the private loader runs it, the same rule as `lazydp epsilon --epochs`.
    total_steps = steps_for_epochs(cfg.epochs, epoch_steps(cfg.sampler, q, n, cfg.batch_size))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if int(test.num_rows) == 0:  # found now, not after the privacy budget is spent
        raise DataError(
            f"{root}: the test split has 0 rows, so the trained model cannot be evaluated; "
            "preprocess with a test fraction > 0 (e.g. --test-fraction 0.1) or more input rows."
        )
    privacy_cost = _privacy_cost(meta, root)
    delta = _left_for_training(delta, privacy_cost, "delta", "--delta")
    sigma = cfg.noise_multiplier
    calibrated = sigma is None and cfg.mode != "sgd"
    if sigma is None:
        sigma = (
            0.0
            if cfg.mode == "sgd"
            else calibrate_noise_multiplier(
                _left_for_training(
                    float(cfg.target_epsilon or 0), privacy_cost, "epsilon", "--target-epsilon"
                ),
                delta,
                q,
                total_steps,
                sampler=cfg.sampler,
            )
        )
    return RunPlan(
        root, train, test, kind, n, delta, q, total_steps, privacy_cost, digest, sigma, calibrated
    )


def model_and_optimizers(
    train: Any, cfg: TrainConfig, kind: str
) -> tuple[dict[str, Any], nn.Module, list[torch.optim.Optimizer]]:
    """(spec, model, [dense optimizer, table SGD]): the tables in their own SGD group, which
    LazyDP defers exactly; the MLPs on Adam or SGD."""
    torch.manual_seed(cfg.model_seed)  # model init only; DP noise is drawn in lazydp.noise
    check_model_fits(train, cfg)
    spec = model_spec(train, cfg, kind)  # report.json records it: load_trained rebuilds it
    model = model_from_spec(spec)
    tables = [
        p
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters()
    ]
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    dense_opt: torch.optim.Optimizer = (
        torch.optim.Adam(dense, lr=cfg.dense_lr)
        if cfg.dense_optimizer == "adam"
        else torch.optim.SGD(dense, lr=cfg.dense_lr)
    )
    table_opt = torch.optim.SGD(
        tables, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    optimizers = [dense_opt, table_opt]
    return spec, model, optimizers


def open_engine(
    engine_cls: type[PrivacyEngine], cfg: TrainConfig, out: Path, rank: int, delta: float
) -> PrivacyEngine:
    """The engine on this rank's ledger in ``out``, after refusing a ledger that does not fit
    the request: one from an earlier run without --resume, a checkpoint without its ledger, or
    a --resume with nothing to continue (a ledger is never reset)."""
    ledger_file = ledger_path(out, rank)
    if not cfg.resume and ledger_file.exists() and not _nothing_trained(out, ledger_file):
        raise ConfigError(
            f"{ledger_file} exists from an earlier run; pass --resume to continue it or choose "
            "another --out (a ledger is never reset)."
        )
    if cfg.resume and (out / "checkpoint.pt").exists() and not ledger_file.exists():
        raise ConfigError(
            f"--resume: {out} holds a checkpoint but no ledger for rank {rank} "
            f"({ledger_file.name}): it was deleted or moved, or the run started with another "
            "number of processes. A checkpoint is never resumed without the ledger of what it "
            "spent: restore that file, or resume with the --nproc-per-node the run started with."
        )
    engine = engine_cls(seed=cfg.seed, ledger_path=ledger_file)
    if cfg.resume and not (out / "checkpoint.pt").exists() and engine.ledger.steps:
        if (out / "model.pt").exists() and (out / "report.json").exists():
            raise ConfigError(
                f"--resume: the run in {out} finished ({engine.ledger.steps} charged steps, "
                "model.pt and report.json written) and kept no checkpoint, so there is "
                "nothing to continue. To train again start a new run with another --out (this "
                "ledger keeps what was spent)."
            )
        charged = steps_text(engine.ledger.steps, "charged")
        if (out / "model.pt").exists():  # written only once training is over, then the report
            raise ConfigError(
                f"--resume: the run in {out} finished training ({charged}) and wrote "
                "model.pt, the trained model, but stopped before report.json (killed, or "
                "the report could not be written); it kept no checkpoint, so there is nothing "
                "to continue. model.pt is complete, and the ledger holds its privacy cost: "
                '`python -c "from lazydp.ledger import PrivacyLedger; '
                f'print(PrivacyLedger({str(ledger_file)!r}).summary({delta!r}))"`. To train '
                "again start a new run with another --out (this ledger keeps what was spent)."
            )
        raise ConfigError(
            f"--resume: {out} holds a ledger with {charged} but no checkpoint.pt "
            "to continue from (it was killed before its first checkpoint, "
            "which comes after --checkpoint-every steps or 10 minutes of training). Training "
            "from step 0 would spend more budget on a model "
            "that starts over, and replace model.pt. Start a new run with another --out; this "
            "ledger keeps what was spent."
        )
    return engine


def _nothing_trained(out: Path, ledger_file: Path) -> bool:
    """Whether ``ledger_file`` is only what a run refused before its first step left behind
    (no charged step, no checkpoint): a new run may then continue that ledger without
    --resume. It keeps every line (a vocabulary charge there is matched, not charged again)."""
    if (out / "checkpoint.pt").exists():
        return False
    try:
        ledger = PrivacyLedger(ledger_file)
    except (PrivacyError, OSError, ValueError):
        return False  # a damaged ledger: the usual refusal names the file
    try:
        return ledger.steps == 0
    finally:
        ledger.close()
