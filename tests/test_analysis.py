"""The LoRA paper's §7 diagnostics against independent expectations: subspaces built to
share a known number of directions, random subspaces against their analytic mean,
matrices with chosen singular values, and an update whose amplification is worked out
by hand; then the per-run callback and the sweep CLI on real runs."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from loralab.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_state_dict
from loralab.analysis import (
    analyze_adapter,
    analyze_model,
    analyze_update,
    effective_rank,
    layer_means,
    random_subspace_similarity,
    stable_rank,
    subspace_similarity,
)
from loralab.lora import LoRAConfig, LoRALinear, inject_lora

from conftest import TINY, compose, run_train
from wandb_offline import offline_runs


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
    assert row["projected_weight_norm_random"] == pytest.approx(2 * math.sqrt(126.25) / 4)  # r ‖W‖_F / √(out·in)
    assert row["amplification"] == pytest.approx(5 / math.sqrt(101))
    assert row["top_r_energy_share"] == pytest.approx(16 / 25)
    assert row["top_r_energy_share_random"] == pytest.approx(4 / 16)


def test_random_directions_project_w_to_the_stated_baseline():
    """The root of the mean ‖Uᵀ W V‖_F² over random orthonormal U, V (Monte Carlo) is
    projected_weight_norm_random."""
    g = torch.Generator().manual_seed(0)
    out_features, in_features, rank, trials = 12, 9, 3, 3000
    W = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    squares = torch.stack([(orthonormal(out_features, g)[:, :rank].T @ W @ orthonormal(in_features, g)[:, :rank])
                           .square().sum() for _ in range(trials)])
    row = analyze_update(torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g),
                         scale=1.0, weight=W)
    tolerance = 4 * squares.std().item() / math.sqrt(trials)
    assert squares.mean().item() == pytest.approx(row["projected_weight_norm_random"] ** 2, abs=tolerance)


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


# --- per run: the AdapterAnalysis callback ----------------------------------------------


def saved_adapter_analysis(run_dir: Path) -> list[dict]:
    """What analyze_adapter makes of the run's saved adapter and the base it records."""
    from safetensors.torch import load_file

    from loralab.base import load_recorded_base

    meta = json.loads((run_dir / "adapter" / ADAPTER_CONFIG).read_text())
    base = load_recorded_base(meta["base"]).state_dict()
    return analyze_adapter(load_file(run_dir / "adapter" / ADAPTER_WEIGHTS), LoRAConfig(**meta["lora"]).scale, base)


@pytest.mark.slow
def test_a_lora_run_records_its_adapters_analysis_in_the_summary_and_wandb(tmp_path, base_cache):
    from loralab.run import train

    cfg = compose([*TINY, "logger=wandb", f"paths.cache_dir={base_cache}", f"paths.output_dir={tmp_path}"])
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = saved_adapter_analysis(tmp_path)
    assert [row["layer"] for row in expected] == [f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in
                                                  ("q_proj", "v_proj")]
    assert len(summary["analysis"]) == len(expected)
    # equal up to LAPACK's rounding
    for recorded, row in zip(summary["analysis"], expected):
        assert recorded.keys() == row.keys()
        for name, value in row.items():
            assert recorded[name] == (value if name == "layer" else pytest.approx(value, rel=1e-6)), name
    for name, value in layer_means(expected).items():
        assert summary["metrics"][name] == pytest.approx(value, rel=1e-6), name
    [run] = [r for r in offline_runs(tmp_path) if r.job_type == "finetune"]
    assert run.metric("analysis/amplification_mean") == [summary["metrics"]["analysis/amplification_mean"]]
    [table_path] = run.metric("analysis/layers/path")  # the run file holds a reference to the table's file
    table = json.loads((run.path.parent / "files" / table_path).read_text())
    amplification = table["columns"].index("amplification")
    assert [row[amplification] for row in table["data"]] == pytest.approx([row["amplification"] for row in expected])


@pytest.mark.slow
def test_full_fine_tuning_has_no_adapter_to_analyse(tmp_path, base_cache):
    from loralab.run import train

    train(compose([*TINY, "lora=full", "logger=none", f"paths.cache_dir={base_cache}", f"paths.output_dir={tmp_path}"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["analysis"] == [] and not any(name.startswith("analysis/") for name in summary["metrics"])


# --- per sweep: python -m loralab.analyze ------------------------------------------------------


def test_a_directory_without_adapters_is_one_clear_error(tmp_path, capsys):
    from loralab.analyze import main

    (tmp_path / "0").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith(f"error: {tmp_path} holds no readable adapter of a completed run")


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """``-m lora.rank=2,4 seed=1,2``: jobs 0, 1 at r = 2 (seeds 1, 2), jobs 2, 3 at r = 4, logged to
    W&B (offline); its own base cache, so the one base file there is the sweep's."""
    tmp = tmp_path_factory.mktemp("analyze")
    run_train(["-m", "lora.rank=2,4", "seed=1,2", *TINY, f"paths.cache_dir={tmp / 'cache'}",
               f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp)
    [base] = (tmp / "cache").glob("base-*.safetensors")
    return tmp / "sweep", base


def markdown_rows(text: str, header_start: str) -> list[dict]:
    """The rows of the Markdown table in ``text`` whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:]):
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def number(cell: str) -> float:
    """The value of a cell such as ``0.123`` or ``0.123 ± 0.01``."""
    return float(cell.split("±")[0])


def top_direction(lora_A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(lora_A.double())[2][0]  # the first right singular vector, (in,)


@pytest.mark.slow
def test_analyze_cli_reports_the_adapters_own_numbers(tiny_sweep):
    from safetensors.torch import load_file

    sweep_dir, base_file = tiny_sweep
    # no --base: the base each adapter_config.json records
    result = subprocess.run([sys.executable, "-m", "loralab.analyze", str(sweep_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = (sweep_dir / "analysis.md").read_text()
    figures = ("subspace_rank_2_vs_4", "subspace_seeds_0", "subspace_seeds_1", "spectra")
    for name in figures:
        assert (sweep_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name}.png)" in text
    [wandb_run] = offline_runs(sweep_dir / "analysis")  # the analysis's own run, in the jobs' group
    assert (wandb_run.job_type, wandb_run.group) == ("analysis", offline_runs(sweep_dir / "0")[-1].group)
    synced = {p.parent.parent.name for p in sweep_dir.glob("*/wandb/offline-run-*")}  # the README's sync glob
    assert "analysis" in synced and "0" in synced
    for name in figures:
        assert wandb_run.metric(f"analysis/{name}/_type") == ["image-file"], name

    base = load_file(base_file)
    adapters = {job: load_file(sweep_dir / str(job) / "adapter" / "adapter.safetensors") for job in range(4)}
    layers = sorted(key.removesuffix(".lora_A") for key in adapters[0] if key.endswith(".lora_A"))
    per_run = {row["job"]: row for row in markdown_rows(text, "| job |")}
    for job, rank in ((0, 2), (3, 4)):
        amplifications = []
        for layer in layers:  # §7.3 from the definition: ΔW's top-r directions U, V; ‖ΔW‖_F / ‖Uᵀ W V‖_F
            A, B = adapters[job][f"{layer}.lora_A"].double(), adapters[job][f"{layer}.lora_B"].double()
            delta = 16 / rank * B @ A
            U, _, Vh = torch.linalg.svd(delta)
            W = base[f"{layer}.weight"].double()
            amplifications.append((delta.norm() / (U[:, :rank].T @ W @ Vh[:rank].T).norm()).item())
        reported = number(per_run[str(job)]["amplification"])
        assert reported == pytest.approx(sum(amplifications) / len(amplifications), rel=5e-3)
        recorded = json.loads((sweep_dir / str(job) / "summary.json").read_text())["metrics"]
        assert reported == pytest.approx(recorded["analysis/amplification_mean"], rel=5e-3)

    # r = 2 against r = 4, runs of different seeds paired: jobs 0–3 and 1–2; φ(1, 1) = (v₁ · v₂)²
    [first_layer] = markdown_rows(text, "| layer | φ(1, 1) | random(1, 1) | φ(1, 4)")[:1]
    overlaps = [(top_direction(adapters[a][f"{layers[0]}.lora_A"]) @ top_direction(adapters[b][f"{layers[0]}.lora_A"]))
                .square().item() for a, b in ((0, 3), (1, 2))]
    assert first_layer["layer"] == layers[0]
    assert number(first_layer["φ(1, 1)"]) == pytest.approx(sum(overlaps) / 2, rel=5e-3, abs=5e-4)
    assert number(first_layer["random(1, 1)"]) == pytest.approx(1 / 64, rel=5e-3)  # 1·1 / (d·1), d = 64


@pytest.mark.slow
def test_analyze_cli_without_base_weights_says_what_it_left_out(tiny_sweep, tmp_path):
    from loralab.sweep_analysis import write_analysis

    sweep_dir, base_file = tiny_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    for config in copy.glob("*/adapter/adapter_config.json"):  # an adapter that names no base
        meta = json.loads(config.read_text())
        meta.pop("base", None)
        config.write_text(json.dumps(meta))
    text = write_analysis(copy).read_text()
    assert "No base weights: adapter_config.json records no base model" in text
    assert {row["amplification"] for row in markdown_rows(text, "| job |")} == {""}
    given = write_analysis(copy, base=base_file).read_text()  # --base FILE
    assert "No base weights" not in given
    assert all(number(row["amplification"]) > 0 for row in markdown_rows(given, "| job |"))


def test_the_analysis_of_a_qlora_layer_uses_its_dequantized_base():
    from loralab.lora import LoRAConfig, inject_lora, lora_layers
    from loralab.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=64))
    inject_lora(model, LoRAConfig(rank=2, quantize="nf4"))
    layer = next(iter(lora_layers(model).values()))
    torch.nn.init.normal_(layer.lora_B)
    [row, *_] = analyze_model(model)
    expected = analyze_update(layer.lora_A, layer.lora_B, layer.scale,
                              layer.base_layer.dequantize_weight().double())
    assert row["amplification"] == pytest.approx(expected["amplification"])


@pytest.mark.slow
def test_analyze_lists_every_job_it_left_out_and_why(tiny_sweep, tmp_path, capsys):
    """Job 0's summary cut off mid-write, job 1's adapter truncated, job 2's with a missing key:
    each left out with its reason, in analysis.md and on the console; job 3 analysed."""
    from safetensors.torch import load_file, save_file

    from loralab.analyze import main

    sweep_dir, _ = tiny_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    (copy / "0" / "summary.json").write_text('{"status": "compl')
    (copy / "1" / "adapter" / "adapter.safetensors").write_bytes(b"\x10\x00")
    tensors = load_file(copy / "2" / "adapter" / "adapter.safetensors")
    tensors.pop(sorted(k for k in tensors if k.endswith("lora_B"))[0])
    save_file(tensors, copy / "2" / "adapter" / "adapter.safetensors")
    main([str(copy)])
    console = capsys.readouterr().err
    text = (copy / "analysis.md").read_text()
    for job, why in (("0", "its summary is unreadable"), ("1", "its adapter cannot be read"),
                     ("2", "its adapter cannot be read")):
        assert f"Job {job} left out: {why}" in text and f"Job {job} left out: {why}" in console
    assert [row["job"] for row in markdown_rows(text, "| job |")] == ["3"]
