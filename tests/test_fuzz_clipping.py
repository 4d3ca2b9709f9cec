"""Randomized differential fuzzer for per-example clipping (DP invariant 4 + the clipped sum).

For each random case a small model is built from supported layers (Linear on 2/3/4-D input,
Embedding, EmbeddingBag, LayerNorm, fallback layers: Conv1d and a custom module with its own
Parameters), with random options (bias, padding_idx, sparse, per_sample_weights, offsets form,
include_last_offset, empty bags, repeated ids, a layer called twice, an output used twice,
frozen parameters, float64). One to three steps of plain SGD(lr=1) run under ``zero_noise()`` in every
private mode; the parameter change must equal -(sum_i c_i g_i) / B_expected with g_i from a
batch-of-one autograd reference over the whole model and c_i = min(1, C / ||g_i||). The
per-example norms the engine computed (read by wrapping dp_optimizer.clip_factors) must equal
the reference norms.

Run as a script:  python -m tests.test_fuzz_clipping [--cases N] [--seed S] [--modes a,b] [--noise-check] [-v]
Multi-step cases are teacher-forced: each step is checked from the parameters the engine
reached, so float32 trajectories cannot drift apart. With --noise-check, every mode must also
end where dpsgd_f does under constant_noise(0.5) (LazyDP deferred noise vs eager).
As a pytest test: ``test_fuzz_fixed_seeds`` runs a fixed-seed subset.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lazydp.optim.dp_optimizer as dpo
from lazydp import PrivacyEngine
from lazydp.testing import constant_noise, zero_noise

DP_MODES = ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"]
# Per-example rounding allowance, in ulps of the model's dtype (see reference_step).
_ULPS = 8
N_DATA = 64  # dataset size of the loader given to make_private (only sets q = B_exp / N)


# ----------------------------------------------------------------------------- blocks
# A block is an nn.Module holding child layers; forward(batch) -> (B, H) features.
# example(gen) -> dict of per-example raw data; collate(list) -> dict of batched inputs.


class Affine(nn.Module):
    """A custom leaf with its own Parameters (goes to the torch.func fallback)."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(h))
        self.shift = nn.Parameter(torch.randn(h))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale + self.shift)


def _reduce(y: Tensor) -> Tensor:
    """(B, ..., H) -> (B, H) by summing the middle dimensions."""
    return y.reshape(y.shape[0], -1, y.shape[-1]).sum(1)


def _act(name: str, y: Tensor) -> Tensor:
    return {"id": lambda t: t, "tanh": torch.tanh, "relu": torch.relu}[name](y)


class LinearBlock(nn.Module):
    kind = "linear"

    def __init__(self, r: random.Random, h: int, key: str) -> None:
        super().__init__()
        self.key = key
        self.din = r.randint(1, 4)
        self.bias = r.random() < 0.6
        self.shape = self._shape(r)
        self.twice = r.random() < 0.3  # the same Linear called on a second input
        self.shape2 = self._shape(r)
        self.use_twice = r.random() < 0.3  # its output feeds two ops
        # LayerNorm on the sequence output. Not over fewer than 3 elements: over 1, x_hat is 0
        # up to rounding; over 2, x_hat is +-1 and its gradient is ill-conditioned (float32
        # rounding differences grow ~400x per step), which gives false positives.
        self.ln = r.random() < 0.25 and len(self.shape) > 0 and h > 2
        self.ln_bias = r.random() < 0.5
        self.act = r.choice(["id", "tanh", "relu"])
        self.unused = r.random() < 0.15  # an extra call whose output never reaches the loss
        self.kw = r.random() < 0.3  # call as lin(input=x)
        self.noncontig = r.random() < 0.3  # a transposed-layout (non-contiguous) input
        self.ln2d = self.ln and len(self.shape) >= 1 and r.random() < 0.4  # normalized_shape (T, H)
        self.lin = nn.Linear(self.din, h, bias=self.bias)
        if self.ln:
            self.norm = nn.LayerNorm((self.shape[-1], h) if self.ln2d else h, bias=self.ln_bias)
            with torch.no_grad():
                self.norm.weight.normal_()
                if self.norm.bias is not None:
                    self.norm.bias.normal_()

    @staticmethod
    def _shape(r: random.Random) -> tuple[int, ...]:
        nd = r.choice([2, 3, 4])
        return {2: (), 3: (r.randint(1, 3),), 4: (r.randint(1, 2), r.randint(1, 3))}[nd]

    def describe(self) -> str:
        return (
            f"Linear(in={self.din}, bias={self.bias}, x{(None, *self.shape)}, "
            f"twice={self.twice and (None, *self.shape2)}, use_twice={self.use_twice}, "
            f"ln={self.ln and ('bias' if self.ln_bias else 'nobias')}, act={self.act}, "
            f"unused_call={self.unused}, kw={self.kw}, noncontig={self.noncontig}, ln2d={self.ln2d})"
        )

    def example(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
        ex = {"x": torch.randn(*self.shape, self.din, generator=g, dtype=dtype)}
        if self.twice:
            ex["x2"] = torch.randn(*self.shape2, self.din, generator=g, dtype=dtype)
        return ex

    def collate(self, exs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([e[k] for e in exs]) for k in exs[0]}

    def forward(self, b: dict[str, Any]) -> Tensor:
        d = b[self.key]
        x = d["x"]
        if self.noncontig and x.dim() >= 2:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        y = self.lin(input=x) if self.kw else self.lin(x)
        if self.ln:
            y = self.norm(y)
        y = _reduce(y) if y.dim() > 2 else y
        if self.twice:
            y2 = self.lin(d["x2"])
            y = y + (_reduce(y2) if y2.dim() > 2 else y2)
        if self.unused:
            self.lin(d["x"] * 2)  # recorded, but no gradient reaches it
        y = _act(self.act, y)
        if self.use_twice:
            y = y * torch.sigmoid(y)
        return y


class EmbeddingBlock(nn.Module):
    kind = "embedding"

    def __init__(self, r: random.Random, h: int, key: str) -> None:
        super().__init__()
        self.key = key
        self.rows = r.randint(2, 10)
        self.pad = r.randrange(self.rows) if r.random() < 0.4 else None
        self.sparse = r.random() < 0.4
        self.length = r.choice([0, 1, 2, 3, 5, (2, 2), (1, 3)])  # 0: 1-D ids; tuple: 3-D ids
        self.length2 = r.choice([0, 1, 3])
        self.twice = r.random() < 0.3
        self.seq_linear = r.random() < 0.3 and self.length != 0  # Linear on (B, L, H)
        self.hot = r.randint(1, self.rows)  # ids drawn from the first `hot` rows: repeats
        self.id_dtype = torch.int32 if r.random() < 0.2 else torch.int64
        self.emb = nn.Embedding(self.rows, h, padding_idx=self.pad, sparse=self.sparse)
        if self.seq_linear:
            self.proj = nn.Linear(h, h, bias=r.random() < 0.5)

    def describe(self) -> str:
        return (
            f"Embedding(rows={self.rows}, pad={self.pad}, sparse={self.sparse}, "
            f"L={self.length}, twice={self.twice and self.length2}, hot={self.hot}, "
            f"seq_linear={self.seq_linear}, ids={str(self.id_dtype)[6:]})"
        )

    def _ids(self, g: torch.Generator, length: Any) -> Tensor:
        shape = length if isinstance(length, tuple) else (() if length == 0 else (length,))
        ids = torch.randint(0, self.hot, shape, generator=g)
        if self.pad is not None and length != 0:
            mask = torch.rand(shape, generator=g) < 0.3
            ids = torch.where(mask, torch.full_like(ids, self.pad), ids)
        return ids.to(self.id_dtype)

    def example(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
        ex = {"ids": self._ids(g, self.length)}
        if self.twice:
            ex["ids2"] = self._ids(g, self.length2)
        return ex

    def collate(self, exs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([e[k] for e in exs]) for k in exs[0]}

    def forward(self, b: dict[str, Any]) -> Tensor:
        d = b[self.key]
        e = self.emb(d["ids"])
        if self.seq_linear:
            e = torch.tanh(self.proj(e))
        y = _reduce(e) if e.dim() > 2 else e
        if self.twice:
            e2 = self.emb(d["ids2"])
            y = y + (_reduce(e2) if e2.dim() > 2 else e2)
        return y


class BagBlock(nn.Module):
    kind = "embedding_bag"

    def __init__(self, r: random.Random, h: int, key: str) -> None:
        super().__init__()
        self.key = key
        self.rows = r.randint(2, 10)
        self.mode = r.choice(["sum", "mean"])
        # "uniform": 1-D ids + offsets with every bag the same length (the fast path)
        self.form = r.choice(["2d", "offsets", "uniform"])
        self.include_last = r.random() < 0.4
        self.pad = r.randrange(self.rows) if r.random() < 0.4 else None
        self.length = r.randint(1, 4)  # 2-D form
        self.max_len = r.randint(0, 4)  # offsets form: 0..max_len ids per bag (empty bags)
        psw_choices = ["none"] if self.mode == "mean" else ["none", "const", "grad"]
        self.psw = r.choice(psw_choices)
        if self.psw == "grad" and self.form != "2d":
            self.psw = "const"  # a grad-carrying psw layer must see the batch in dim 0
        self.twice = r.random() < 0.3
        self.hot = r.randint(1, self.rows)
        self.kw = r.random() < 0.3  # call as bag(input=..., offsets=..., per_sample_weights=...)
        self.id_dtype = torch.int32 if r.random() < 0.2 else torch.int64
        self.bag = nn.EmbeddingBag(
            self.rows,
            h,
            mode=self.mode,
            include_last_offset=self.include_last,
            padding_idx=self.pad,
        )
        if self.psw == "grad":
            self.wlin = nn.Linear(1, 1)

    def describe(self) -> str:
        return (
            f"EmbeddingBag(rows={self.rows}, mode={self.mode}, form={self.form}, "
            f"include_last_offset={self.include_last}, pad={self.pad}, "
            f"L={self.length if self.form != 'offsets' else f'0..{self.max_len}'}, psw={self.psw}, "
            f"twice={self.twice}, hot={self.hot}, ids={str(self.id_dtype)[6:]}, kw={self.kw})"
        )

    def _one(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
        if self.form == "offsets":
            n = int(torch.randint(0, self.max_len + 1, (), generator=g))
        else:
            n = self.length
        ids = torch.randint(0, self.hot, (n,), generator=g)
        if self.pad is not None:
            mask = torch.rand(n, generator=g) < 0.3
            ids = torch.where(mask, torch.full_like(ids, self.pad), ids)
        ex = {"ids": ids.to(self.id_dtype)}
        if self.psw != "none":
            ex["w"] = torch.rand(n, generator=g, dtype=dtype) * 2 - 0.5
        return ex

    def example(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        ex = {"a": self._one(g, dtype)}
        if self.twice:
            ex["b"] = self._one(g, dtype)
        return ex

    def _collate_one(self, exs: list[dict[str, Tensor]]) -> dict[str, Any]:
        if self.form == "2d":
            out = {"ids": torch.stack([e["ids"] for e in exs]), "offsets": None}
            if "w" in exs[0]:
                out["w"] = torch.stack([e["w"] for e in exs])
            return out
        lengths = [e["ids"].numel() for e in exs]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        if not self.include_last:
            offsets = offsets[:-1]
        out = {
            "ids": torch.cat([e["ids"] for e in exs]),
            "offsets": torch.tensor(offsets, dtype=self.id_dtype),
        }
        if "w" in exs[0]:
            out["w"] = torch.cat([e["w"] for e in exs])
        return out

    def collate(self, exs: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"a": self._collate_one([e["a"] for e in exs])}
        if self.twice:
            out["b"] = self._collate_one([e["b"] for e in exs])
        return out

    def _call(self, d: dict[str, Any]) -> Tensor:
        w = d.get("w")
        if self.psw == "grad":
            w = torch.sigmoid(self.wlin(w.unsqueeze(-1)).squeeze(-1))
        if self.kw:
            return self.bag(input=d["ids"], offsets=d["offsets"], per_sample_weights=w)
        return self.bag(d["ids"], d["offsets"], w)

    def forward(self, b: dict[str, Any]) -> Tensor:
        d = b[self.key]
        y = self._call(d["a"])
        if self.twice:
            y = y + 0.5 * self._call(d["b"])
        return y


class ConvBlock(nn.Module):
    kind = "conv1d_fallback"

    def __init__(self, r: random.Random, h: int, key: str) -> None:
        super().__init__()
        self.key = key
        self.cin = r.randint(1, 3)
        self.k = r.randint(1, 3)
        self.len = self.k + r.randint(0, 3)
        self.conv = nn.Conv1d(self.cin, h, self.k, bias=r.random() < 0.6)

    def describe(self) -> str:
        return (
            f"Conv1d(cin={self.cin}, k={self.k}, L={self.len}, bias={self.conv.bias is not None})"
        )

    def example(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"x": torch.randn(self.cin, self.len, generator=g, dtype=dtype)}

    def collate(self, exs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {"x": torch.stack([e["x"] for e in exs])}

    def forward(self, b: dict[str, Any]) -> Tensor:
        return torch.tanh(self.conv(b[self.key]["x"])).sum(-1)


class AffineBlock(nn.Module):
    kind = "custom_fallback"

    def __init__(self, r: random.Random, h: int, key: str) -> None:
        super().__init__()
        self.key = key
        self.h = h
        self.twice = r.random() < 0.3
        self.aff = Affine(h)

    def describe(self) -> str:
        return f"Affine(custom Parameter module, twice={self.twice})"

    def example(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"x": torch.randn(self.h, generator=g, dtype=dtype)}

    def collate(self, exs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {"x": torch.stack([e["x"] for e in exs])}

    def forward(self, b: dict[str, Any]) -> Tensor:
        y = self.aff(b[self.key]["x"])
        if self.twice:
            y = y + self.aff(y)
        return y


class DoubledEmbedding(nn.Embedding):
    """An Embedding subclass with its own forward: goes to the fallback (not a lazy table)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 2.0


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: goes to the fallback."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.nn.functional.linear(input, self.weight * 1.5, self.bias)


class MiscFallbackBlock(nn.Module):
    """Other layers without a registered clipper (torch.func fallback)."""

    kind = "misc_fallback"

    def __init__(self, r: random.Random, h: int, key: str) -> None:
        super().__init__()
        self.key = key
        self.h = h
        self.which = r.choice(
            ["groupnorm", "prelu", "bilinear", "conv2d", "emb_subclass", "linear_subclass"]
        )
        self.twice = r.random() < 0.3
        if self.which == "groupnorm":
            self.c = 2 * r.randint(1, 2)
            self.layer = nn.GroupNorm(2, self.c)
            with torch.no_grad():
                self.layer.weight.normal_()
                self.layer.bias.normal_()
            self.lin = nn.Linear(self.c, h)
        elif self.which == "prelu":
            self.layer = nn.PReLU(h if r.random() < 0.5 else 1, init=0.3)
        elif self.which == "bilinear":
            self.layer = nn.Bilinear(2, 3, h, bias=r.random() < 0.5)
        elif self.which == "conv2d":
            self.layer = nn.Conv2d(2, h, 2, bias=r.random() < 0.5)
        elif self.which == "emb_subclass":
            self.rows = r.randint(2, 6)
            self.layer = DoubledEmbedding(self.rows, h)
        else:
            self.layer = ScaledLinear(3, h, bias=r.random() < 0.5)

    def describe(self) -> str:
        return f"Fallback({self.which}, twice={self.twice})"

    def example(self, g: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
        w = self.which
        if w == "groupnorm":
            return {"x": torch.randn(self.c, 3, generator=g, dtype=dtype)}
        if w == "prelu":
            return {"x": torch.randn(self.h, generator=g, dtype=dtype)}
        if w == "bilinear":
            return {
                "x": torch.randn(2, generator=g, dtype=dtype),
                "z": torch.randn(3, generator=g, dtype=dtype),
            }
        if w == "conv2d":
            return {"x": torch.randn(2, 3, 3, generator=g, dtype=dtype)}
        if w == "emb_subclass":
            return {"x": torch.randint(0, self.rows, (3,), generator=g)}
        return {"x": torch.randn(2, 3, generator=g, dtype=dtype)}

    def collate(self, exs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([e[k] for e in exs]) for k in exs[0]}

    def _one(self, d: dict[str, Tensor]) -> Tensor:
        w = self.which
        if w == "groupnorm":
            return self.lin(self.layer(d["x"]).sum(-1))
        if w == "prelu":
            return self.layer(d["x"])
        if w == "bilinear":
            return self.layer(d["x"], d["z"])
        if w == "conv2d":
            return torch.tanh(self.layer(d["x"])).sum((-1, -2))
        return _reduce(self.layer(d["x"]))

    def forward(self, b: dict[str, Any]) -> Tensor:
        d = b[self.key]
        y = self._one(d)
        if self.twice:
            y = y + 0.5 * self._one(
                {k: v.flip(-1) if v.is_floating_point() else v for k, v in d.items()}
            )
        return y


BLOCKS = {
    c.kind: c
    for c in (LinearBlock, EmbeddingBlock, BagBlock, ConvBlock, AffineBlock, MiscFallbackBlock)
}


# ----------------------------------------------------------------------------- the model


@dataclass
class Spec:
    seed: int
    kinds: list[str]
    hidden: int
    out: int
    post_ln: bool
    post_affine: bool
    head_bias: bool
    dtype: torch.dtype
    freeze_p: float
    batch: int
    expected_batch: int
    reduction: str
    clip_q: str  # "between" | "below_all" | "above_all"
    zero_p: float
    combine: str = "sum"  # "sum" | "cat" of the blocks' (B, H) outputs
    steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class FuzzModel(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        r = random.Random(spec.seed * 7919 + 1)
        torch.manual_seed(spec.seed)
        h = spec.hidden
        self.blocks = nn.ModuleList([BLOCKS[k](r, h, f"b{i}") for i, k in enumerate(spec.kinds)])
        width = h * len(spec.kinds) if spec.combine == "cat" else h
        # (width >= 3: see LinearBlock's LayerNorm)
        self.post_ln = (
            nn.LayerNorm(width, bias=r.random() < 0.5) if spec.post_ln and width > 2 else None
        )
        if self.post_ln is not None:
            with torch.no_grad():
                self.post_ln.weight.normal_()
        self.post_affine = Affine(width) if spec.post_affine else None
        self.head = nn.Linear(width, spec.out, bias=spec.head_bias)
        self.combine = spec.combine
        self.to(spec.dtype)
        params = list(self.named_parameters())
        frozen = [n for n, _ in params if r.random() < spec.freeze_p]
        if len(frozen) == len(params):
            frozen = frozen[:-1]
        for n, p in params:
            if n in frozen:
                p.requires_grad_(False)

    def describe(self) -> str:
        frozen = [n for n, p in self.named_parameters() if not p.requires_grad]
        parts = [b.describe() for b in self.blocks]
        if self.post_ln is not None:
            parts.append(f"post LayerNorm(bias={self.post_ln.bias is not None})")
        if self.post_affine is not None:
            parts.append("post Affine")
        return "; ".join(parts) + f"; frozen={frozen}"

    def forward(self, batch: dict[str, Any]) -> Tensor:
        ys = [blk(batch) for blk in self.blocks]
        if self.combine == "cat":
            h = torch.cat(ys, 1)
        else:
            h = ys[0]
            for y in ys[1:]:
                h = h + y
        if self.post_ln is not None:
            h = self.post_ln(h)
        if self.post_affine is not None:
            h = self.post_affine(h)
        return self.head(h)


def example_losses(out: Tensor, y: Tensor, m: Tensor) -> Tensor:
    """Per-example loss l_i; uses the output twice; m_i = 0 gives an exactly zero gradient."""
    return m * (((out - y) ** 2).sum(1) + 0.3 * torch.sin(out).sum(1))


def reduce_loss(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def random_spec(seed: int) -> Spec:
    r = random.Random(seed)
    kinds = [r.choice(list(BLOCKS)) for _ in range(r.randint(1, 3))]
    return Spec(
        seed=seed,
        kinds=kinds,
        hidden=r.randint(1, 4),
        out=r.choice([1, 2]),
        post_ln=r.random() < 0.2,
        post_affine=r.random() < 0.15,
        head_bias=r.random() < 0.7,
        dtype=torch.float64 if r.random() < 0.3 else torch.float32,
        freeze_p=r.choice([0.0, 0.0, 0.2, 0.4]),
        batch=r.choice([1, 1, 2, 3, 4, 5, 8]),
        expected_batch=r.choice([1, 2, 4, 5, 8, 16]),
        reduction=r.choice(["mean", "mean", "sum"]),
        clip_q=r.choice(["between", "between", "between", "below_all", "above_all"]),
        zero_p=r.choice([0.0, 0.0, 0.3]),
        combine=r.choice(["sum", "cat"]),
        steps=r.choice([1, 1, 2, 3]),
        extra={
            "batches": [0] + [r.choice([1, 2, 3, 5]) for _ in range(8)],
            "root_kwargs": r.random() < 0.2,  # model(batch=...) instead of model(...)
        },
    )


def make_data(
    spec: Spec, model: FuzzModel, step: int = 0
) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
    """One step's batch: per-example raw inputs, targets y (B, K) and loss mask m (B,)."""
    g = torch.Generator().manual_seed(spec.seed + 12345 + 1000 * step)
    batch = spec.batch if step == 0 else spec.extra.get("batches", [spec.batch] * 9)[step]
    exs = []
    for _ in range(batch):
        exs.append({blk.key: blk.example(g, spec.dtype) for blk in model.blocks})
    y = torch.randn(batch, spec.out, generator=g, dtype=spec.dtype)
    m = (torch.rand(batch, generator=g) >= spec.zero_p).to(spec.dtype)
    return exs, y, m


def collate(model: FuzzModel, exs: list[dict[str, Any]]) -> dict[str, Any]:
    return {blk.key: blk.collate([e[blk.key] for e in exs]) for blk in model.blocks}


# ----------------------------------------------------------------------------- reference


def per_example_grads(model: FuzzModel, spec: Spec, exs, y, m) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example full-model gradients by batch-of-one autograd: {name: (B, *shape)} (float64)
    for trainable params, and the (B,) norms."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(len(exs)):
        out = model(collate(model, [exs[i]]))
        loss = reduce_loss(example_losses(out, y[i : i + 1], m[i : i + 1]), spec.reduction)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), gr in zip(params.items(), grads):
            per[n].append(torch.zeros_like(p) if gr is None else gr.to_dense())
    stacked = {n: torch.stack(v).double() for n, v in per.items()}
    norms2 = sum((g.reshape(len(exs), -1) ** 2).sum(1) for g in stacked.values())
    return stacked, torch.as_tensor(norms2, dtype=torch.float64).sqrt()


def choose_clip(spec: Spec, norms: Tensor) -> float:
    pos = norms[norms > 0]
    if pos.numel() == 0:
        return 1.0
    lo, hi = float(pos.min()), float(pos.max())
    r = random.Random(spec.seed + 99)
    if spec.clip_q == "below_all":
        return lo * r.uniform(0.2, 0.9)
    if spec.clip_q == "above_all":
        return hi * r.uniform(1.1, 3.0)
    if lo == hi:
        return lo * 0.7
    return r.uniform(lo, hi)


def load_params(model: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n].to(p.dtype))
    return model


def reference_step(spec: Spec, params: dict[str, Tensor], batch, clip: float | None):
    """From ``params`` (the engine's, so that trajectories never drift apart), one SGD(lr=1)
    step on sum_i min(1, C/||g_i||) g_i / B_exp with g_i from batch-of-one autograd. Returns
    the expected parameters (float64), the reference norms, and C (chosen here when None)."""
    model = load_params(FuzzModel(spec), params)
    exs, y, m = batch
    grads, norms = per_example_grads(model, spec, exs, y, m)
    if clip is None:
        clip = choose_clip(spec, norms)
    c = (clip / norms.clamp_min(1e-300)).clamp(max=1.0)
    c[norms == 0] = 1.0
    want, mag = {}, {}
    for n, p in params.items():
        want[n] = p.double().clone()
        mag[n] = torch.zeros_like(want[n])
        if n in grads:
            want[n] -= torch.einsum("b,b...->...", c, grads[n]) / spec.expected_batch
            # 8 ulps of sum_i |c_i g_i| / B_exp: the scale of rounding errors made per
            # example, which cancellation in the sum does not shrink
            ulp = torch.finfo(spec.dtype).eps / 2
            mag[n] = (
                _ULPS * ulp * torch.einsum("b,b...->...", c, grads[n].abs()) / spec.expected_batch
            )
    return want, norms, float(clip), mag


# ----------------------------------------------------------------------------- engine run


@contextlib.contextmanager
def record_norms(store: list[Tensor]):
    """Wrap dp_optimizer.clip_factors to record the per-example squared norms it is given."""
    orig = dpo.clip_factors

    def wrapped(norms2: Tensor, max_grad_norm: float) -> Tensor:
        store.append(norms2.detach().clone())
        return orig(norms2, max_grad_norm)

    dpo.clip_factors = wrapped
    try:
        yield
    finally:
        dpo.clip_factors = orig


def run_engine(spec: Spec, mode: str, clip: float, batches, noise=zero_noise):
    """make_private + one SGD(lr=1) step per batch under ``noise()``. Returns the parameters
    before, the parameters read directly after each step (float64; with zero noise LazyDP rows
    lag by nothing), the flushed state_dict values at the end, and the per-example norms the
    engine used at each step."""
    model = FuzzModel(spec)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(N_DATA)), batch_size=spec.expected_batch)
    engine = PrivacyEngine(seed=0)
    store: list[Tensor] = []
    snapshots: list[dict[str, Tensor]] = []
    # Everything, the final flush included, under the noise override: LazyDP draws its
    # deferred noise at the flush, so a flush outside it would add real noise.
    with noise(), record_norms(store), torch.enable_grad():
        model, opt, _ = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=clip,
            mode=mode,
            loss_reduction=spec.reduction,
        )
        try:
            for exs, y, m in batches:
                opt.zero_grad()
                inputs = collate(model, exs)
                out = model(batch=inputs) if spec.extra.get("root_kwargs") else model(inputs)
                reduce_loss(example_losses(out, y, m), spec.reduction).backward()
                opt.step()
                snapshots.append(
                    {n: p.detach().double().clone() for n, p in model.named_parameters()}
                )
            engine.flush()
            sd = model.state_dict()
            after = {n: sd[n].detach().double().clone() for n in before}
        finally:
            engine.detach()
    return before, snapshots, after, [v.sqrt() for v in store]


# ----------------------------------------------------------------------------- one case


@dataclass
class Outcome:
    seed: int
    mode: str
    status: str  # "ok" | "mismatch" | "refused" | "crash" | "skip"
    detail: str = ""
    describe: str = ""
    check: str = "clip"  # "clip": vs the batch-of-one reference; "noise": vs dpsgd_f


def tolerances(dtype: torch.dtype, steps: int = 1) -> tuple[float, float]:
    """(rtol, atol) for one step; atol is scaled by max(1, |param|) in _compare."""
    rtol, atol = (1e-4, 2e-5) if dtype == torch.float32 else (1e-9, 1e-11)
    return rtol * steps, atol * steps


# Exceptions that count as a clear refusal (the library's own error types).
def _is_library_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("lazydp")


def _failure(seed, mode, exc, desc, check="clip") -> Outcome:
    status = "refused" if _is_library_error(exc) else "crash"
    tb = traceback.format_exc(limit=-3)
    return Outcome(seed, mode, status, f"{type(exc).__name__}: {exc}\n{tb}", desc, check)


def _compare(before, after, want, rtol, atol, mag=None) -> list[str]:
    problems = []
    for n in before:
        scale = (
            max(1.0, float(before[n].abs().max()), float(want[n].abs().max()))
            if before[n].numel()
            else 1.0
        )
        allowed = atol * scale + rtol * want[n].abs()
        if mag is not None:
            allowed = allowed + mag[n]
        if not bool(((after[n] - want[n]).abs() <= allowed).all()):
            err = float((after[n] - want[n]).abs().max())
            moved = float((want[n] - before[n]).abs().max())
            problems.append(f"param {n}: max |got - want| = {err:.3g} (want moved by {moved:.3g})")
    return problems


def run_case(seed: int, modes: list[str] = DP_MODES, noise_check: bool = False) -> list[Outcome]:
    spec = random_spec(seed)
    model0 = FuzzModel(spec)
    batches = [make_data(spec, model0, t) for t in range(spec.steps)]
    desc = (
        f"seed={seed} B={[len(b[0]) for b in batches]} B_exp={spec.expected_batch} "
        f"red={spec.reduction} dtype={str(spec.dtype)[6:]} out={spec.out} H={spec.hidden} "
        f"head_bias={spec.head_bias} combine={spec.combine} | " + model0.describe()
    )
    init = {n: p.detach().double().clone() for n, p in model0.named_parameters()}
    try:
        _, _, clip, _ = reference_step(spec, init, batches[0], None)
    except Exception as exc:  # the plain model itself fails: not a library matter
        return [Outcome(seed, "-", "skip", f"reference failed: {exc!r}", desc)]
    rtol, atol = tolerances(spec.dtype)
    outcomes = []
    for mode in modes:
        try:
            before, snaps, final, eng_norms = run_engine(spec, mode, clip, batches)
        except Exception as exc:
            outcomes.append(_failure(seed, mode, exc, desc))
            continue
        problems = []
        if len(eng_norms) != len(batches):
            problems.append(
                f"engine recorded {len(eng_norms)} norm vectors for {len(batches)} steps"
            )
        prev = before
        for t, batch in enumerate(batches):
            want, rn, _, mag = reference_step(spec, prev, batch, clip)
            en = eng_norms[t] if t < len(eng_norms) else torch.full_like(rn, float("nan"))
            if en.shape != rn.shape or not torch.allclose(en.double(), rn, rtol=rtol, atol=atol):
                problems.append(
                    f"step {t} norms: engine {[round(float(v), 6) for v in en]} "
                    f"reference {[round(float(v), 6) for v in rn]}"
                )
                if en.shape == rn.shape:
                    ce = (clip / (en.double() + 1e-12)).clamp(max=1.0)
                    problems.append(
                        f"  C={clip:.6g}; effective norm after clipping (engine c_i x true "
                        f"||g_i||) = {[round(float(v), 6) for v in ce * rn]}"
                    )
            problems += [f"step {t} {p}" for p in _compare(prev, snaps[t], want, rtol, atol, mag)]
            prev = snaps[t]
        problems += [
            f"final flushed state: {p}" for p in _compare(before, final, snaps[-1], rtol, atol)
        ]
        if problems:
            problems.append(f"C={clip:.6g}")
        outcomes.append(
            Outcome(seed, mode, "mismatch" if problems else "ok", "\n".join(problems), desc)
        )
    if noise_check:
        outcomes += _noise_check(seed, spec, batches, clip, desc, modes)
    return outcomes


def _noise_check(seed, spec, batches, clip, desc, modes) -> list[Outcome]:
    """Under constant_noise(0.5) every private mode must end where dpsgd_f does (LazyDP's
    deferred/aggregated noise against eager per-step noise; tables' eager path vs dense)."""
    noise = lambda: constant_noise(0.5)  # noqa: E731
    try:
        _, _, ref, _ = run_engine(spec, "dpsgd_f", clip, batches, noise)
    except Exception as exc:
        return [_failure(seed, "dpsgd_f", exc, desc, "noise")]
    out = []
    rtol, atol = tolerances(spec.dtype, 10 * spec.steps)  # trajectories may drift apart a little
    for mode in modes:
        if mode == "dpsgd_f":
            continue
        try:
            before, _, after, _ = run_engine(spec, mode, clip, batches, noise)
        except Exception as exc:
            out.append(_failure(seed, mode, exc, desc, "noise"))
            continue
        problems = _compare(before, after, ref, rtol, atol)
        out.append(
            Outcome(
                seed, mode, "mismatch" if problems else "ok", "\n".join(problems), desc, "noise"
            )
        )
    return out


# ----------------------------------------------------------------------------- drivers


def fuzz(seeds, modes=DP_MODES, verbose=False, noise_check=False):
    torch.set_num_threads(1)
    results: list[Outcome] = []
    for s in seeds:
        out = run_case(s, modes, noise_check)
        results.extend(out)
        if verbose:
            for o in out:
                if o.status != "ok":
                    print(
                        f"[{o.status}/{o.check}] seed {o.seed} {o.mode}: {o.describe}\n  {o.detail}\n",
                        flush=True,
                    )
    return results


FIXED_SEEDS = list(range(0, 150))  # about 25 s on one thread of this 2-core machine (see report)


def test_fuzz_fixed_seeds() -> None:
    """A fixed-seed subset: every private mode must match the batch-of-one reference (one to
    three steps, zero noise), and under constant_noise every mode must end where dpsgd_f does."""
    results = fuzz(FIXED_SEEDS, noise_check=True)
    bad = [o for o in results if o.status in ("mismatch", "crash")]
    msg = "\n\n".join(
        f"[{o.status}/{o.check}] seed {o.seed} {o.mode}: {o.describe}\n{o.detail}" for o in bad[:5]
    )
    assert not bad, f"{len(bad)} failing (case, mode) pairs:\n{msg}"
    assert sum(o.status == "ok" for o in results) >= 0.9 * len(results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(DP_MODES))
    ap.add_argument(
        "--noise-check", action="store_true", help="also compare modes under constant_noise"
    )
    ap.add_argument("-v", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = fuzz(
        range(args.seed, args.seed + args.cases), args.modes.split(","), args.v, args.noise_check
    )
    from collections import Counter

    counts = Counter((o.check, o.mode, o.status) for o in results)
    for k in sorted(counts):
        print(k, counts[k])
    kinds = Counter(
        k for s in range(args.seed, args.seed + args.cases) for k in set(random_spec(s).kinds)
    )
    print("block kinds (cases containing):", dict(kinds))
    print(f"{time.time() - t0:.1f}s")
    return 0 if not any(o.status in ("mismatch", "crash") for o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
