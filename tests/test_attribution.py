"""Tests of the attribution metrics (docs/methods.md sec. 4) and the per-feature tables built on them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch

from posttrain_probe.analysis import (
    CATEGORIES,
    FeatureStats,
    categorize,
    decoder_cosine,
    decoder_norms,
    feature_activation_stats,
    feature_table,
    latent_scaling,
    mas,
    mas_dominant,
    model_index,
    norm_ratio,
    nrn,
    summary,
    write_table,
)
from posttrain_probe.errors import ProbeError


def stand_in_crosscoder(W_dec: torch.Tensor, model_names: list[str], seed: int = 0, bias: torch.Tensor | None = None):
    """A STAND-IN for the crosscoder interface the analysis relies on (not the real Crosscoder):
    ``W_dec`` [F, N, d], ``config.model_names``, and ``encode(x [B, N, d]) -> relu(x.flatten(1) @ W + b)``."""
    n_features, n_models, d_model = W_dec.shape
    generator = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(n_models * d_model, n_features, generator=generator, dtype=W_dec.dtype)
    b_enc = torch.zeros(n_features, dtype=W_dec.dtype) if bias is None else bias

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ W_enc + b_enc)

    return SimpleNamespace(W_dec=W_dec, config=SimpleNamespace(model_names=list(model_names)), encode=encode)


def decoder_from_norms(norms: list[list[float]], d_model: int = 3) -> torch.Tensor:
    """[F, N, d] decoder whose vector (i, m) is norms[i][m] along axis m (so its L1 and L2 norms agree)."""
    W = torch.zeros(len(norms), len(norms[0]), d_model, dtype=torch.float64)
    for i, row in enumerate(norms):
        for m, value in enumerate(row):
            W[i, m, m % d_model] = value
    return W


# Seven features over (base, sft, rl) with known NRN / NormRatio / MAS (global max norm = 1).
KNOWN_NORMS = [
    [1.0, 1.0, 1.0],  # 0: shared everywhere
    [1.0, 0.0, 1.0],  # 1: base-only vs sft (NormRatio 1, NRN 0), shared with rl
    [0.0, 1.0, 0.5],  # 2: sft-only (NRN 1, NormRatio 0); rl-only (NormRatio 0.25)
    [0.5, 0.6, 0.5],  # 3: shared (NormRatio 0.45)
    [0.0, 0.0, 0.0],  # 4: dead
    [0.2, 0.9, 0.2],  # 5: sft-leaning (NRN 0.818, NormRatio 0.15)
    [0.0, 0.0, 1.0],  # 6: live, but base and sft are both 0 -> NRN_sft undefined
]
NAMES = ["base", "sft", "rl"]


# ---------------------------------------------------------------- worked values (docs/methods.md sec. 4)


def test_nrn_worked_values():
    W = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]]], dtype=torch.float64)
    assert nrn(W, 0, 1, p=1).item() == pytest.approx(0.571429, abs=1e-6)
    assert nrn(W, 0, 1, p=2).item() == pytest.approx(0.585786, abs=1e-6)
    assert nrn(W, 0, 1).item() == pytest.approx(4 / 7, abs=1e-12)  # p = 1 is the default (paper R)
    assert nrn(W, 1, 0, p=1).item() == pytest.approx(3 / 7, abs=1e-12)  # swapping roles gives 1 - NRN


def test_mas_worked_values_sum_to_one_and_dominant():
    W = torch.tensor([[[1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, -1.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(mas(W, p=1)[0], torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    assert mas_dominant(mas(W)).tolist() == [0]  # tie between base and sft goes to the lower slot

    W = torch.randn(50, 4, 8, generator=torch.Generator().manual_seed(1))
    for p in (1, 2, 0.5, math.inf):
        torch.testing.assert_close(mas(W, p).sum(dim=1), torch.ones(50))
    scores = mas(W)
    torch.testing.assert_close(mas_dominant(scores), scores.argmax(dim=1))


def test_dead_features_are_nan_everywhere():
    W = decoder_from_norms(KNOWN_NORMS)
    assert torch.isnan(nrn(W, 0, 1))[[4, 6]].all() and not torch.isnan(nrn(W, 0, 1))[[0, 1, 2, 3, 5]].any()
    assert torch.isnan(norm_ratio(W, 0, 1))[[4, 6]].all()
    assert torch.isnan(mas(W)[4]).all() and not torch.isnan(mas(W)[6]).any()
    assert mas_dominant(mas(W)).tolist() == [0, 0, 1, 1, -1, 1, 2]
    assert categorize(norm_ratio(W, 0, 1))[4] == "dead"
    assert torch.isnan(decoder_cosine(W, 0, 1))[[2, 4, 6]].all()  # any zero vector makes the cosine undefined


def test_decoder_norms():
    W = torch.tensor([[[3.0, -4.0], [0.0, 0.0]], [[1.0, 1.0], [-2.0, 0.0]]])
    torch.testing.assert_close(decoder_norms(W), torch.tensor([[5.0, 0.0], [math.sqrt(2), 2.0]]))
    torch.testing.assert_close(decoder_norms(W, p=1), torch.tensor([[7.0, 0.0], [2.0, 2.0]]))
    torch.testing.assert_close(decoder_norms(W, p=math.inf), torch.tensor([[4.0, 0.0], [1.0, 2.0]]))
    assert decoder_norms(W.to(torch.bfloat16)).dtype == torch.float32  # half precision is upcast


# ---------------------------------------------------------------- NormRatio (paper S eq. 2)


def test_norm_ratio_bounds_extremes_and_direction():
    W = decoder_from_norms([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, 0.5], [1.5, 0.5]])
    ratio = norm_ratio(W, 0, 1)
    assert ratio[0].item() == 1.0  # fine-tuned decoder zero, base norm is the global max
    assert ratio[1].item() == 0.0  # the reverse
    assert ratio[2].item() == 0.5 and ratio[3].item() == 0.5  # equal norms, whatever their size
    assert ratio[4].item() == pytest.approx(((1.5 - 0.5) / 2 + 1) / 2)
    # Direction: opposite to NRN. Base-heavy -> NormRatio > 0.5 but NRN < 0.5.
    assert ratio[4] > 0.5 and nrn(W, 0, 1)[4] < 0.5
    assert norm_ratio(W, 1, 0)[4] < 0.5

    # The max runs over all features and all models, including a third model's slot.
    W3 = torch.cat([W, torch.zeros(5, 1, 3, dtype=W.dtype)], dim=1)
    W3[3, 2, 2] = 4.0
    assert norm_ratio(W3, 0, 1)[0].item() == pytest.approx(0.75)

    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        W = torch.randn(200, 3, 16, generator=generator) * torch.rand(200, 3, 1, generator=generator) ** 4
        W[::7, 1] = 0
        W[::11, 0] = 0
        ratio = norm_ratio(W, 0, 1)
        assert torch.isnan(ratio[::77]).all()  # both decoders zero
        live = ratio[torch.arange(200) % 77 != 0]
        assert torch.isfinite(live).all()
        assert ((live >= 0) & (live <= 1)).all()


def test_categorize_bands_and_edges():
    literal = [0.4, 0.6, 0.3999, 0.6001, 0.0, 1.0, 0.5, math.nan]
    values = torch.tensor(literal, dtype=torch.float32)
    expected = ["shared", "shared", "finetune-only", "base-only", "finetune-only", "base-only", "shared", "dead"]
    assert categorize(values).tolist() == expected
    assert categorize(torch.tensor(literal, dtype=torch.float64)).tolist() == expected
    assert categorize(values.numpy()).tolist() == expected
    assert categorize([0.4, 0.6, 0.61, float("nan")]).tolist() == ["shared", "shared", "base-only", "dead"]
    assert set(expected) == set(CATEGORIES)
    # The bands are options.
    wide = categorize(values, base_only_above=0.7, finetune_only_below=0.3)
    assert wide.tolist()[:4] == ["shared"] * 4
    with pytest.raises(ProbeError, match="must not exceed"):
        categorize(values, base_only_above=0.3, finetune_only_below=0.7)


def test_decoder_cosine():
    W = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 0.0]],
            [[1.0, 0.0], [0.0, 3.0]],
            [[1.0, 1.0], [-1.0, -1.0]],
            [[1.0, 0.0], [1.0, 1.0]],
            [[0.0, 0.0], [1.0, 1.0]],
        ]
    )
    cos = decoder_cosine(W, 0, 1)
    torch.testing.assert_close(cos[:4], torch.tensor([1.0, 0.0, -1.0, 1 / math.sqrt(2)]))
    assert math.isnan(cos[4].item())
    torch.testing.assert_close(decoder_cosine(W, 1, 0), cos, equal_nan=True)


# ---------------------------------------------------------------- latent scaling (Minder et al.)


def test_latent_scaling_matches_least_squares_per_feature():
    generator = torch.Generator().manual_seed(3)
    T, F, N, d = 40, 6, 2, 5
    f = torch.relu(torch.randn(T, F, generator=generator, dtype=torch.float64))
    f[:, 5] = 0  # never fires -> undefined
    W = torch.randn(F, N, d, generator=generator, dtype=torch.float64)
    W[2, 1] = 0  # zero decoder in model 1 -> undefined
    Y = torch.randn(T, N, d, generator=generator, dtype=torch.float64)
    beta = latent_scaling(f, Y, W)
    assert beta.shape == (F, N)
    for j in range(F):
        for m in range(N):
            column = torch.outer(f[:, j], W[j, m]).reshape(-1, 1)
            if column.abs().sum() == 0:
                assert math.isnan(beta[j, m].item())
                continue
            reference = torch.linalg.lstsq(column, Y[:, m].reshape(-1, 1)).solution.item()
            assert beta[j, m].item() == pytest.approx(reference, rel=1e-10, abs=1e-12)


def test_latent_scaling_planted():
    generator = torch.Generator().manual_seed(4)
    f = torch.rand(30, 3, generator=generator, dtype=torch.float64)
    W = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    # Y^m = 3 f_1 d_1^m in model 0 and nothing in model 1: beta = (3, 0) for feature 1.
    Y = torch.zeros(30, 2, 4, dtype=torch.float64)
    Y[:, 0] = 3 * torch.outer(f[:, 1], W[1, 0])
    beta = latent_scaling(f, Y, W)
    assert beta[1, 0].item() == pytest.approx(3.0)
    assert beta[1, 1].item() == 0.0
    assert latent_scaling(f.float(), Y.float(), W)[1, 0].item() == pytest.approx(3.0)


# ---------------------------------------------------------------- feature statistics, table, summary


def test_feature_activation_stats_matches_direct_computation():
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(8, 2, 4, generator=generator)
    bias = torch.zeros(8)
    bias[3] = -1e6  # never fires
    cc = stand_in_crosscoder(W, ["base", "tuned"], bias=bias)
    batches = [torch.randn(n, 2, 4, generator=generator) for n in (5, 0, 17, 9)]
    stats = feature_activation_stats(cc, iter(batches))
    codes = cc.encode(torch.cat(batches))
    assert isinstance(stats, FeatureStats) and stats.n_tokens == 31
    torch.testing.assert_close(stats.frequency, (codes > 0).double().mean(dim=0))
    torch.testing.assert_close(stats.max_activation, codes.amax(dim=0))
    assert stats.frequency[3].item() == 0.0 and stats.max_activation[3].item() == 0.0

    table = feature_table(cc, base="base", stats=stats)
    assert table.column("dead").to_pylist() == [i == 3 for i in range(8)]
    assert table.column("category_tuned")[3].as_py() == "dead" and table.column("mas_dominant")[3].as_py() is None
    np.testing.assert_allclose(table.column("frequency").to_numpy(), stats.frequency.numpy())
    np.testing.assert_allclose(table.column("max_activation").to_numpy(), stats.max_activation.numpy())


def test_feature_table_columns_and_values():
    W = decoder_from_norms(KNOWN_NORMS)
    cc = stand_in_crosscoder(W, NAMES)
    table = feature_table(cc, base="base")
    assert table.column_names == [
        "feature",
        *[f"{kind}_{m}" for m in ("sft", "rl") for kind in ("nrn", "norm_ratio", "category", "cosine")],
        *[f"{kind}_{m}" for m in NAMES for kind in ("norm", "mas")],
        "mas_dominant",
        "dead",
        "duplicate_group",
    ]
    assert table.num_rows == 7 and table.column("feature").to_pylist() == list(range(7))
    np.testing.assert_allclose(table.column("nrn_sft").to_numpy(), nrn(W, 0, 1).numpy(), equal_nan=True)
    np.testing.assert_allclose(table.column("norm_ratio_rl").to_numpy(), norm_ratio(W, 0, 2).numpy(), equal_nan=True)
    np.testing.assert_allclose(table.column("cosine_sft").to_numpy(), decoder_cosine(W, 0, 1).numpy(), equal_nan=True)
    np.testing.assert_allclose(table.column("norm_rl").to_numpy(), [1, 1, 0.5, 0.5, 0, 0.2, 1])
    np.testing.assert_allclose(table.column("mas_sft").to_numpy(), mas(W)[:, 1].numpy(), equal_nan=True)
    assert table.column("category_sft").to_pylist() == [
        "shared",
        "base-only",
        "finetune-only",
        "shared",
        "dead",
        "finetune-only",
        "dead",
    ]
    assert table.column("category_rl").to_pylist() == [
        "shared",
        "shared",
        "finetune-only",
        "shared",
        "dead",
        "shared",
        "finetune-only",
    ]
    assert table.column("mas_dominant").to_pylist() == ["base", "base", "sft", "sft", None, "sft", "rl"]
    assert table.column("dead").to_pylist() == [False, False, False, False, True, False, False]
    # p is passed through to NRN and MAS.
    table2 = feature_table(cc, base="base", p=2)
    np.testing.assert_allclose(table2.column("nrn_sft").to_numpy(), nrn(W, 0, 1, p=2).numpy(), equal_nan=True)
    # Another base: the tuned columns follow.
    assert "nrn_base" in feature_table(cc, base="sft").column_names


def _assert_tables_match(read: pa.Table, table: pa.Table) -> None:
    assert read.column_names == table.column_names and read.num_rows == table.num_rows
    for name in table.column_names:
        original, back = table.column(name), read.column(name)
        if pa.types.is_floating(original.type):
            np.testing.assert_allclose(back.to_numpy(), original.to_numpy(), rtol=1e-15, equal_nan=True)
        else:
            assert back.to_pylist() == original.to_pylist(), name


def test_write_table_csv_and_parquet_round_trip(tmp_path):
    W = decoder_from_norms(KNOWN_NORMS)
    W[:, :, 1] += torch.linspace(0.01, 0.07, 7)[:, None] / 3  # non-round floats
    table = feature_table(stand_in_crosscoder(W, NAMES), base="base")

    parquet_path = write_table(table, tmp_path / "out" / "features.parquet")
    assert parquet_path == tmp_path / "out" / "features.parquet"
    read = pyarrow.parquet.read_table(parquet_path)
    assert read.schema == table.schema
    _assert_tables_match(read, table)

    csv_path = write_table(table, tmp_path / "features.csv")
    read = pyarrow.csv.read_csv(
        csv_path, convert_options=pyarrow.csv.ConvertOptions(column_types=table.schema, strings_can_be_null=True)
    )
    _assert_tables_match(read, table)

    with pytest.raises(ProbeError, match=r"\.csv or \.parquet.*'\.json'"):
        write_table(table, tmp_path / "features.json")
    with pytest.raises(ProbeError, match="suffix"):
        write_table(table, tmp_path / "features")


def test_summary_counts_exclude_dead():
    W = decoder_from_norms(KNOWN_NORMS)
    table = feature_table(stand_in_crosscoder(W, NAMES), base="base")
    result = summary(table, base="base", model_names=NAMES)
    json.dumps(result)  # JSON-ready
    # Without activations liveness is unknown: only the zero decoder is known dead, n_dead is not claimed.
    assert result["n_features"] == 7 and result["liveness"] == "unknown" and result["base"] == "base"
    assert result["n_dead"] is None and result["n_zero_decoder"] == 1

    sft = result["models"]["sft"]
    scores = [0.5, 0.0, 1.0, 0.6 / 1.1, 0.9 / 1.1]  # features 0, 1, 2, 3, 5 (4 dead, 6 undefined)
    assert sft["n"] == 5
    assert sft["categories"] == {"base-only": 1, "shared": 2, "finetune-only": 2, "undefined": 1}
    assert sft["nrn_tails"] == {"nrn>0.7": 2, "nrn<0.3": 1, "nrn>0.9": 1, "nrn<0.1": 1}
    assert sft["nrn_mean"] == pytest.approx(np.mean(scores))
    assert sft["nrn_median"] == pytest.approx(0.6 / 1.1)

    rl = result["models"]["rl"]
    assert rl["n"] == 6
    assert rl["categories"] == {"base-only": 0, "shared": 4, "finetune-only": 2, "undefined": 0}
    assert rl["nrn_tails"] == {"nrn>0.7": 2, "nrn<0.3": 0, "nrn>0.9": 2, "nrn<0.1": 0}
    assert rl["nrn_median"] == pytest.approx(0.5)
    assert result["mas_dominant"] == {"base": 2, "sft": 3, "rl": 1}
    assert sum(result["mas_dominant"].values()) == 7 - result["n_zero_decoder"]

    # A feature dead by frequency only drops out of the counts too.
    stats = FeatureStats(
        frequency=torch.tensor([0.5, 0.0, 0.5, 0.5, 0.0, 0.5, 0.5], dtype=torch.float64),
        max_activation=torch.ones(7),
        n_tokens=2,
    )
    result = summary(
        feature_table(stand_in_crosscoder(W, NAMES), base="base", stats=stats),
        base="base",
        model_names=NAMES,
        liveness="activations",
    )
    assert result["n_dead"] == 2 and result["n_zero_decoder"] is None
    assert result["models"]["sft"]["categories"]["base-only"] == 0 and result["models"]["sft"]["n"] == 4
    assert result["mas_dominant"] == {"base": 1, "sft": 3, "rl": 1}

    # All dead: no counts, null statistics.
    empty = summary(
        feature_table(stand_in_crosscoder(torch.zeros(3, 3, 2), NAMES), base="base"), base="base", model_names=NAMES
    )
    assert (
        empty["n_zero_decoder"] == 3 and empty["models"]["sft"]["n"] == 0 and empty["models"]["sft"]["nrn_mean"] is None
    )


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_probe_error():
    W = torch.randn(4, 3, 5)
    with pytest.raises(ProbeError, match=r"\[F, N, d\].*\(4, 15\)"):
        nrn(W.reshape(4, 15), 0, 1)
    with pytest.raises(ProbeError, match="floating-point"):
        mas(torch.ones(2, 2, 2, dtype=torch.int64))
    with pytest.raises(ProbeError, match=r"tuned=3 is out of range.*3 model slots"):
        nrn(W, 0, 3)
    with pytest.raises(ProbeError, match="base=-1 is out of range"):
        norm_ratio(W, -1, 1)
    with pytest.raises(ProbeError, match="must be different"):
        nrn(W, 1, 1)
    with pytest.raises(ProbeError, match="slot index"):
        decoder_cosine(W, "base", 1)
    for p in (0, -1, float("nan")):
        with pytest.raises(ProbeError, match=r"p must be a number > 0.*got"):
            nrn(W, 0, 1, p=p)
        with pytest.raises(ProbeError, match="p must be"):
            mas(W, p=p)
    with pytest.raises(ProbeError, match=r"\[F, N\]"):
        mas_dominant(torch.ones(3))
    with pytest.raises(ProbeError, match="1-d"):
        categorize(torch.ones(2, 2))

    f, Y = torch.rand(10, 4), torch.rand(10, 3, 5)
    with pytest.raises(ProbeError, match=r"f must be a \[T, F\].*F = 4.*\(10, 3\)"):
        latent_scaling(f[:, :3], Y, W)
    with pytest.raises(ProbeError, match=r"Y must be a \[T, N, d\].*T = 10.*\(9, 3, 5\)"):
        latent_scaling(f, Y[:9], W)

    cc = stand_in_crosscoder(W, NAMES)
    with pytest.raises(
        ProbeError, match=r"base 'instruct' is not one of the crosscoder's models \['base', 'sft', 'rl'\]"
    ):
        feature_table(cc, base="instruct")
    with pytest.raises(ProbeError, match="p must be"):
        feature_table(cc, base="base", p=0)
    with pytest.raises(ProbeError, match="not one of"):
        summary(feature_table(cc, base="base"), base="instruct", model_names=NAMES)
    with pytest.raises(ProbeError, match=r"lacks columns \['nrn_sft'"):
        summary(feature_table(cc, base="base").drop_columns(["nrn_sft"]), base="base", model_names=NAMES)
    with pytest.raises(ProbeError, match="3 distinct names"):
        feature_table(stand_in_crosscoder(W, ["base", "sft"]), base="base")
    with pytest.raises(ProbeError, match=r"batch 1 must be raw activations of shape \[B, 3, 5\].*\(2, 3, 4\)"):
        feature_activation_stats(cc, [torch.randn(2, 3, 5), torch.randn(2, 3, 4)])
    with pytest.raises(ProbeError, match="no tokens"):
        feature_activation_stats(cc, [])
    with pytest.raises(ProbeError, match="4 features"):
        feature_table(cc, base="base", stats=FeatureStats(torch.zeros(3), torch.zeros(3), 1))
    assert model_index(NAMES, "rl") == 2


def _random_crosscoder(names, n_features=32, d=8, seed=0):
    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.crosscoder.model import Crosscoder

    torch.manual_seed(seed)
    return Crosscoder(CrosscoderConfig(model_names=list(names), d_model=d, n_features=n_features, layer=1))


def test_analyze_result_reads_back_equal(tmp_path):
    from posttrain_probe.analysis import AnalysisResult, AnalyzeConfig
    from posttrain_probe.analysis.report import analyze

    config = AnalyzeConfig(
        crosscoder=tmp_path / "cc", out=tmp_path / "analysis", table_format="csv", duplicate_cosine=0.9
    )
    result = analyze(config, crosscoder=_random_crosscoder(["base", "sft", "rl"]))
    assert AnalysisResult.read(config.out) == result
    assert set(result.models) == {"sft", "rl"} and result.liveness == "unknown" and result.n_features == 32
    assert json.loads((config.out / "summary.json").read_text()) == result.to_json()


def test_analyze_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import posttrain_probe.analysis.report as report
    from posttrain_probe.analysis import AnalyzeConfig
    from posttrain_probe.cli.main import app
    from posttrain_probe.config_io import load_config

    yaml_file = tmp_path / "analyze.yaml"
    yaml_file.write_text(
        "crosscoder: runs/cc\nout: runs/analysis\nacts: [runs/acts]\ntable_format: csv\np: 2.0\nnorm_ratio_scale: pair\n"
    )
    direct = AnalyzeConfig(
        crosscoder="runs/cc",
        out="runs/analysis",
        acts=["runs/acts"],
        table_format="csv",
        p=2.0,
        norm_ratio_scale="pair",
    )
    assert load_config(AnalyzeConfig, yaml_file) == direct
    seen = []
    monkeypatch.setattr(report, "analyze", lambda config, **kwargs: seen.append(config))
    flags = [
        "--crosscoder",
        "runs/cc",
        "--out",
        "runs/analysis",
        "--acts",
        "runs/acts",
        "--table-format",
        "csv",
        "--p",
        "2.0",
        "--norm-ratio-scale",
        "pair",
    ]
    for argv in (flags, ["--config", str(yaml_file)]):
        CliRunner().invoke(app, ["analyze", *argv])
    assert seen == [direct, direct]
