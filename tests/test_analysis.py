"""The LoRA paper's §7 diagnostics against independent expectations: subspaces built to
share a known number of directions, random subspaces against their analytic mean,
matrices with chosen singular values, and an update whose amplification is worked out
by hand; then the per-run callback and the sweep CLI on real runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from loralab.analysis import (analyze_adapter, analyze_model, analyze_update, effective_rank, layer_means,
                              random_subspace_similarity, stable_rank, subspace_similarity)
from loralab.lora import LoRAConfig, LoRALinear, inject_lora, lora_state_dict


def orthonormal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthonormal basis of ℝ^dim, as columns."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q


def adapter_A(directions: torch.Tensor, singular_values: list[float]) -> torch.Tensor:
    """A (r × in) whose right singular vectors are ``directions``' columns, in that order."""
    return torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ directions.T


def with_singular_values(singular_values: list[float], shape=(12, 10), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, V = orthonormal(shape[0], g)[:, :len(singular_values)], orthonormal(shape[1], g)[:, :len(singular_values)]
    return U @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ V.T


# --- §7.2 subspace similarity ------------------------------------------------------


def test_an_adapter_is_fully_similar_to_itself_on_the_diagonal():
    A = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    phi = subspace_similarity(A, A)
    assert phi.shape == (6, 6)
    torch.testing.assert_close(phi.diagonal(), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_similarity_counts_exactly_the_shared_directions(shared):
    """A₁'s top directions are e₀..e₃; A₂'s are e₀..e_{k-1} then directions A₁ lacks. The top-i of
    A₁ and top-j of A₂ then share min(i, j, k) directions: φ = min(i, j, k) / min(i, j)."""
    dim, rank1, rank2 = 16, 4, 6
    basis = orthonormal(dim, torch.Generator().manual_seed(shared))
    first = basis[:, :rank1]
    second = torch.cat([basis[:, :shared], basis[:, rank1:rank1 + rank2 - shared]], dim=1)
    phi = subspace_similarity(adapter_A(first, [4.0, 3.0, 2.0, 1.0]),
                              adapter_A(second, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
    expected = torch.tensor([[min(i, j, shared) / min(i, j) for j in range(1, rank2 + 1)]
                             for i in range(1, rank1 + 1)], dtype=torch.float64)
    torch.testing.assert_close(phi, expected)


def test_random_subspaces_average_to_the_analytic_baseline():
    dim, rank1, rank2, trials = 24, 3, 8, 400
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([subspace_similarity(torch.randn(rank1, dim, generator=g),
                                               torch.randn(rank2, dim, generator=g)) for _ in range(trials)])
    expected = torch.tensor([[i * j / (dim * min(i, j)) for j in range(1, rank2 + 1)]
                             for i in range(1, rank1 + 1)], dtype=torch.float64)
    standard_error = samples.std(dim=0) / math.sqrt(trials)
    assert ((samples.mean(dim=0) - expected).abs() < 4 * standard_error + 1e-3).all()
    torch.testing.assert_close(random_subspace_similarity(dim, rank1, rank2), expected)


# --- ranks of the update --------------------------------------------------------------


@pytest.mark.parametrize("singular_values, eff_rank, stable", [
    ([2.0, 2.0, 2.0, 2.0], 4.0, 4.0),  # equal: both are the rank
    ([5.0], 1.0, 1.0),
    # p = (1/2, 1/3, 1/6): exp(H) = 2^(1/2) · 3^(1/3) · 6^(1/6); stable rank (9 + 4 + 1) / 9
    ([3.0, 2.0, 1.0], 2 ** 0.5 * 3 ** (1 / 3) * 6 ** (1 / 6), 14 / 9),
])
def test_effective_and_stable_rank_of_chosen_singular_values(singular_values, eff_rank, stable):
    S = torch.linalg.svdvals(with_singular_values(singular_values))
    assert effective_rank(S) == pytest.approx(eff_rank, rel=1e-9)
    assert stable_rank(S) == pytest.approx(stable, rel=1e-9)


def test_a_zero_update_has_no_effective_or_stable_rank():
    zeros = torch.zeros(3, dtype=torch.float64)
    assert math.isnan(effective_rank(zeros)) and math.isnan(stable_rank(zeros))


def test_update_svd_from_factors_matches_the_product():
    """analyze_update never forms B A; its singular values must still be those of scale · B A."""
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(5, 30, generator=g), torch.randn(20, 5, generator=g)
    row = analyze_update(A, B, scale=0.5)
    torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64),
                               torch.linalg.svdvals(0.5 * B.double() @ A.double())[:5])  # the rest are 0
    assert row["delta_w_norm"] == pytest.approx((0.5 * B.double() @ A.double()).norm().item())


# --- §7.3 ΔW against W -----------------------------------------------------------------


def hand_layer(rotate: bool) -> LoRALinear:
    """W = diag(10, 5, 1, 0.5) and ΔW = 4 e₀e₀ᵀ + 3 e₂e₂ᵀ (rank 2), optionally both rotated by the
    same orthogonal P, Q (W → P W Qᵀ), which changes none of the numbers below."""
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5], dtype=torch.float64))
    A = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64)  # (r, in)
    B = torch.tensor([[4.0, 0], [0, 0], [0, 3.0], [0, 0]], dtype=torch.float64)  # (out, r)
    if rotate:
        g = torch.Generator().manual_seed(0)
        P, Q = orthonormal(4, g), orthonormal(4, g)
        W, A, B = P @ W @ Q.T, A @ Q.T, P @ B
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float64), rank=2, alpha=4.0)  # scale 2
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B / layer.scale)
    return layer


@pytest.mark.parametrize("rotate", [False, True])
def test_amplification_and_top_r_energy_share_worked_by_hand(rotate):
    """ΔW's directions are e₀, e₂, where W is 10 and 1: ‖Uᵀ W V‖_F = √(10² + 1²) = √101 and
    ‖ΔW‖_F = √(4² + 3²) = 5, so the amplification is 5 / √101. W's top-2 directions are e₀, e₁:
    they hold the 4² of ΔW's 25, a share of 16/25; the random baseline is r² / (out · in) = 4/16."""
    model = nn.Sequential(hand_layer(rotate))
    [row] = analyze_model(model)
    assert row["layer"] == "0" and row["rank"] == 2
    assert row["singular_values"] == pytest.approx([4.0, 3.0])
    assert row["delta_w_norm"] == pytest.approx(5.0)
    assert row["weight_norm"] == pytest.approx(math.sqrt(100 + 25 + 1 + 0.25))
    assert row["projected_weight_norm"] == pytest.approx(math.sqrt(101))
    assert row["amplification"] == pytest.approx(5 / math.sqrt(101))
    assert row["top_r_energy_share"] == pytest.approx(16 / 25)
    assert row["top_r_energy_share_random"] == pytest.approx(4 / 16)


def test_a_merged_layer_is_analysed_against_its_frozen_weight():
    model = nn.Sequential(hand_layer(rotate=True))
    before = analyze_model(model)
    model[0].merge()
    after = analyze_model(model)
    for name in ("amplification", "projected_weight_norm", "top_r_energy_share", "weight_norm"):
        assert after[0][name] == pytest.approx(before[0][name], rel=1e-6), name


def test_saved_tensors_and_base_weights_give_the_models_numbers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 16))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoRAConfig(rank=3, alpha=6.0, target_modules=["0", "2"])
    inject_lora(model, config)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B)
    rows = analyze_adapter(lora_state_dict(model), config.scale, base)
    assert rows == analyze_model(model)  # the same float64 arithmetic on the same numbers
    means = layer_means(rows)
    assert means["analysis/amplification_mean"] == pytest.approx((rows[0]["amplification"] +
                                                                  rows[1]["amplification"]) / 2)
    without_base = analyze_adapter(lora_state_dict(model), config.scale)
    assert "amplification" not in without_base[0]
    assert set(layer_means(without_base)) == {"analysis/eff_rank_mean", "analysis/stable_rank_mean",
                                              "analysis/delta_w_norm_mean"}
