"""DLRM paper configs, the DLRM forward pass, fast table creation, MLP and TabularModel."""

from __future__ import annotations

import math

import pytest
import torch

from lazydp.errors import ConfigError, InputError
from lazydp.models import (
    DLRM,
    MLP,
    PAPER_CONFIGS,
    DLRMConfig,
    TabularModel,
    embedding_bag,
    interaction_width,
    paper_config,
    table_bytes,
)
from lazydp.models.configs import MLPERF_TABLE_ROWS
from lazydp.models.mlp import uniform_table

MLPERF_ROWS = [
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
]  # fmt: skip


def test_paper_configs_match_design_table():
    expected = {
        # name: (rows, d, bottom, top, pooling)
        "mlperf": (MLPERF_ROWS, 128, (13, 512, 256, 128), (1024, 1024, 512, 256, 1), 1),
        "rmc1": ([75_000_000] * 10, 32, (13, 256, 128, 32), (256, 64, 1), 80),
        "rmc2": ([18_750_000] * 40, 32, (13, 256, 128, 32), (512, 128, 1), 80),
        "rmc3": ([75_000_000] * 10, 32, (13, 2560, 512, 32), (512, 128, 1), 20),
        "basic": ([16_000_000] * 26, 64, (13, 512, 256, 64), (512, 512, 256, 1), 1),
    }
    assert set(PAPER_CONFIGS) == set(expected)
    for name, (rows, d, bottom, top, pooling) in expected.items():
        cfg = paper_config(name)
        assert list(cfg.table_rows) == rows
        assert (cfg.embedding_dim, cfg.bottom_mlp, cfg.top_mlp, cfg.pooling) == (
            d,
            bottom,
            top,
            pooling,
        )
    mlperf = paper_config("mlperf")
    assert mlperf.num_tables == 26 and mlperf.total_rows == 187_767_399
    assert round(mlperf.total_rows / 1e6, 1) == 187.8
    assert table_bytes(mlperf) == 187_767_399 * 128 * 4  # the ~96 GB of DESIGN.md
    assert table_bytes(paper_config("rmc2"), dtype_bytes=2) == 750_000_000 * 32 * 2


def test_scale_rounds_rows_and_keeps_one_row():
    cfg = paper_config("mlperf", scale=1e-5)
    assert cfg.table_rows == tuple(max(1, round(r * 1e-5)) for r in MLPERF_TABLE_ROWS)
    assert cfg.table_rows[0] == 399 and cfg.table_rows[5] == 1 and min(cfg.table_rows) == 1
    assert paper_config("rmc1", scale=2.0).table_rows[0] == 150_000_000
    assert cfg.scale == 1e-5
    with pytest.raises(ConfigError, match="scale"):
        paper_config("rmc1", scale=0)
    with pytest.raises(ConfigError, match="scale"):
        paper_config("rmc1", scale=float("nan"))
    with pytest.raises(ConfigError, match="rmc9"):
        paper_config("rmc9")


def test_overrides_pooling_and_embedding_dim():
    cfg = paper_config("rmc2", scale=1e-5, pooling=10, embedding_dim=16)
    assert cfg.pooling == 10 and cfg.embedding_dim == 16 and cfg.bottom_mlp == (13, 256, 128, 16)
    assert cfg.interaction_width == 41 * 40 // 2 + 16


def test_interaction_width():
    assert interaction_width(26, 128) == 27 * 26 // 2 + 128 == 479
    assert interaction_width(10, 32) == 55 + 32
    assert paper_config("rmc2").interaction_width == 820 + 32
    with pytest.raises(ConfigError, match="bottom_mlp"):
        DLRMConfig("bad", (5,), 8, (13, 16), (4, 1), 1)
    with pytest.raises(ConfigError, match="top_mlp"):
        DLRMConfig("bad", (5,), 8, (13, 8), (4, 2), 1)


def _random_sparse(cfg: DLRMConfig, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, r, (batch, cfg.pooling), generator=gen) for r in cfg.table_rows]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_forward_shapes_and_input_forms_agree(name):
    cfg = paper_config(name, scale=1e-5)
    model = DLRM.from_config(cfg, seed=0)
    assert model.top[0].in_features == cfg.interaction_width
    assert model.top[-1].out_features == 1 and model.bottom[-2].out_features == cfg.embedding_dim
    assert [bag.weight.shape[0] for bag in model.embeddings] == list(cfg.table_rows)
    gen = torch.Generator().manual_seed(1)
    dense = torch.rand(3, 13, generator=gen)
    two_d = _random_sparse(cfg, 3, gen)
    flat = [(ids.reshape(-1), torch.arange(0, 3 * cfg.pooling, cfg.pooling)) for ids in two_d]
    out = model(dense, two_d)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(model(dense, flat), out)


def test_forward_matches_explicit_reference_with_ragged_bags():
    cfg = DLRMConfig("toy", (7, 5), 4, (3, 6, 4), (5, 1), 2)
    model = DLRM.from_config(cfg, seed=3)
    dense = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    ids0, off0 = torch.tensor([1, 1, 6, 0]), torch.tensor([0, 3])  # bag 0 repeats id 1
    ids1, off1 = torch.tensor([4, 2]), torch.tensor([0, 1])
    out = model(dense, [(ids0, off0), (ids1, off1)])
    w0, w1 = model.embeddings[0].weight, model.embeddings[1].weight
    for i, (bag0, bag1) in enumerate([([1, 1, 6], [4]), ([0], [2])]):
        x = model.bottom(dense[i : i + 1])[0]
        vectors = [x, w0[bag0].sum(0), w1[bag1].sum(0)]
        dots = [vectors[a] @ vectors[b] for a in range(3) for b in range(a)]
        expected = model.top(torch.cat([x, torch.stack(dots)]).unsqueeze(0))[0, 0]
        torch.testing.assert_close(out[i], expected)


def test_examples_do_not_mix():
    cfg = paper_config("rmc1", scale=1e-6)
    model = DLRM.from_config(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    dense, sparse = torch.rand(4, 13, generator=gen), _random_sparse(cfg, 4, gen)
    before = model(dense, sparse)
    dense2 = dense.clone()
    dense2[3] += 5.0
    sparse2 = [s.clone() for s in sparse]
    sparse2[0][3] = (sparse2[0][3] + 1) % cfg.table_rows[0]
    after = model(dense2, sparse2)
    torch.testing.assert_close(after[:3], before[:3])
    assert not torch.allclose(after[3], before[3])


def test_input_errors():
    cfg = DLRMConfig("toy", (7, 5), 4, (3, 4), (1,), 1)
    model = DLRM.from_config(cfg, seed=0)
    dense = torch.zeros(2, 3)
    ok = [torch.zeros(2, 1, dtype=torch.long)] * 2
    with pytest.raises(InputError, match=r"table 1 has 5 rows"):
        model(dense, [ok[0], torch.tensor([[0], [5]])])
    with pytest.raises(InputError, match="2 tables"):
        model(dense, ok[:1])
    with pytest.raises(InputError, match="dense"):
        model(torch.zeros(2, 4), ok)
    with pytest.raises(InputError, match="offsets"):
        model(dense, [ok[0], (torch.zeros(2, dtype=torch.long), torch.tensor([0]))])
    with pytest.raises(ConfigError, match="max"):
        DLRM.from_config(cfg, mode="max")


def test_sparse_flag_and_mean_mode():
    cfg = DLRMConfig("toy", (7, 5), 4, (3, 4), (1,), 2)
    model = DLRM.from_config(cfg, sparse=True, mode="mean", seed=0)
    ids = [torch.tensor([[0, 2]]), torch.tensor([[4, 4]])]
    model(torch.ones(1, 3), ids).sum().backward()
    grad = model.embeddings[0].weight.grad
    assert grad is not None and grad.is_sparse
    assert model.embeddings[0].mode == "mean"


def test_table_creation_is_vectorised_uniform_and_seeded():
    rows, dim = 1 << 20, 8  # 32 MiB, several fill chunks
    bag = embedding_bag(rows, dim, seed=11)
    w = bag.weight.detach()
    bound = 1 / math.sqrt(rows)
    assert w.shape == (rows, dim) and w.abs().max() <= bound
    assert abs(w.mean().item()) < 0.01 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    # every chunk was filled (no zero tail), and chunks are not copies of each other
    assert (w[-1000:] != 0).all() and not torch.equal(w[:1000], w[-1000:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = uniform_table(rows, dim, bound, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, w)
    assert not torch.equal(uniform_table(rows, dim, bound, seed=12), w)


def test_model_seed_reproducible():
    cfg = paper_config("basic", scale=1e-6)
    a, b, c = (DLRM.from_config(cfg, seed=s) for s in (5, 5, 6))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_mlp_and_tabular_model():
    mlp = MLP(13, [8, 4], 2)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert mlp(torch.zeros(5, 13)).shape == (5, 2)
    assert isinstance(MLP(3, [], 4, final_relu=True)[-1], torch.nn.ReLU)
    model = TabularModel([4, 7], 3, num_dense=2, hidden=[8], seed=0)
    cat = torch.tensor([[3, 6], [0, 1]])
    out = model(torch.ones(2, 2), cat)
    assert out.shape == (2, 1)
    expected = model.mlp(
        torch.cat(
            [
                torch.ones(2, 2),
                model.embeddings[0].weight[cat[:, 0]],
                model.embeddings[1].weight[cat[:, 1]],
            ],
            1,
        )
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(InputError, match="categorical"):
        model(torch.ones(2, 2), cat[:, :1])
    with pytest.raises(InputError, match="dense"):
        model(None, cat)
    assert TabularModel([4], 2, num_dense=0, hidden=[3])(None, cat[:, :1]).shape == (2, 1)


def test_tables_can_live_apart_from_the_mlps():
    # The paper's GPU set-up: tables in host memory, MLPs on the GPU. No CUDA here, so the
    # meta device stands in for the GPU: the tables stay on the CPU, read CPU ids, and their
    # pooled rows move to the MLPs' device (forward only: meta holds no values).
    cfg = paper_config("rmc1", scale=1e-6, pooling=3)
    split = DLRM.from_config(cfg, seed=0, device="meta", table_device="cpu")
    assert {p.device.type for p in split.embeddings.parameters()} == {"cpu"}
    assert {p.device.type for n, p in split.named_parameters() if "embeddings" not in n} == {"meta"}
    sparse = [torch.zeros(4, 3, dtype=torch.long)] * len(cfg.table_rows)
    out = split(torch.zeros(4, 13, device="meta"), sparse)
    assert out.device.type == "meta" and out.shape == (4,)
    # Both on the CPU, the same weights give the same logits as the one-device model.
    same = DLRM.from_config(cfg, seed=0, device="cpu", table_device="cpu")
    one = DLRM.from_config(cfg, seed=0)
    dense = torch.randn(4, 13)
    assert torch.equal(same(dense, sparse), one(dense, sparse))
