"""The adapters of a sweep, analysed as in the LoRA paper's §7: analysis.md and heat maps
(the work of ``python -m loralab.analyze``, imported once its arguments are parsed).

It reads only what the jobs left on disk: ``<job>/adapter/`` (the adapter's tensors and
config) and ``<job>/summary.json`` (status, overrides, seed). Into the sweep directory
it writes ``analysis.md`` with

- per run and per setting (mean ± std over seeds), the layer means of ``loralab.analysis``:
  effective and stable rank, ‖ΔW‖_F and, given the base weights, the amplification
  factor and the top-r energy share (Hu et al. 2021, §7.3);
- the subspace similarity φ(i, j) of the adapters' A (§7.2, Figure 3) between the
  smallest and the largest rank of the sweep, runs paired by seed, and (Figure 4)
  between seeds of one setting, each beside its random-subspace expectation;

and the heat maps of φ and the singular-value spectra of ΔW per rank as PNGs. When the
runs logged to W&B, the figures go there too, as an ``analysis`` run in the sweep's group.
The base weights are the base ``adapter_config.json`` records (verified by its hash), or
``--base``; without them the numbers that compare ΔW with W are left out, with a note.
"""

from __future__ import annotations

import io
import itertools
import re
import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors import SafetensorError

from loralab.adapters import ADAPTER_WEIGHTS
from loralab.analysis import analyze_adapter, random_subspace_similarity, subspace_similarity
from loralab.base import BaseError, load_base, load_recorded_base
from loralab.files import write_atomic
from loralab.layout import (
    RANK_KEY,
    SEED_KEY,
    adapter_dir,
    completed_adapter_jobs,
    left_out,
    no_adapter,
    read_adapter_config,
    seed_of,
    setting_label,
    swept_keys,
)
from loralab.lora_config import lora_scale
from loralab.overrides import swept_overrides

# (row name in analysis.md, per-layer value of loralab.analysis)
LAYER_MEANS = (("eff. rank", "eff_rank"), ("stable rank", "stable_rank"), ("‖ΔW‖_F", "delta_w_norm"),
               ("‖UᵀWV‖_F", "projected_weight_norm"), ("‖UᵀWV‖_F random", "projected_weight_norm_random"),
               ("amplification", "amplification"), ("top-r energy share", "top_r_energy_share"),
               ("top-r energy share random", "top_r_energy_share_random"))
SPECTRA = "spectra.png"


class AnalysisError(ValueError):
    pass


@dataclass
class Adapter:
    """One completed LoRA run of the sweep, as its saved adapter."""

    job: str
    rank: int
    seed: int
    setting: str  # its swept overrides but the seed: what the seeds of one setting share
    context: str  # its swept overrides but the seed and the rank: what runs paired across ranks share
    tensors: dict[str, torch.Tensor]
    layers: list[dict]  # loralab.analysis.analyze_adapter's rows

    def mean(self, name: str) -> float | None:
        values = [row[name] for row in self.layers if name in row]
        return sum(values) / len(values) if values else None


def write_analysis(sweep_dir: str | Path, base: Path | None = None, layers: str | None = None) -> Path:
    """Write analysis.md and its PNGs into ``sweep_dir``; ``layers``, a regular expression, picks
    the layers the heat maps draw (default: all)."""
    sweep_dir = Path(sweep_dir)
    adapters, notes = load_adapters(sweep_dir, base)
    drawn = pick_layers(adapters, layers)
    parts = [f"# Adapter analysis: {sweep_dir}", *notes, per_run_table(adapters), per_setting_table(adapters)]
    parts += rank_section(adapters, drawn, sweep_dir) + seed_sections(adapters, drawn, sweep_dir)
    save_png(plot_spectra(adapters), sweep_dir / SPECTRA)
    parts += ["## Singular values of ΔW per rank (mean over layers and runs)", f"![{SPECTRA}]({SPECTRA})"]
    path = sweep_dir / "analysis.md"
    write_atomic(path, ("\n\n".join(parts) + "\n").encode())
    figures = re.findall(r"!\[(.+?\.png)\]", "\n".join(parts))  # the PNGs analysis.md shows
    log_to_wandb(sweep_dir, adapters, figures)
    return path


# --- reading the sweep -------------------------------------------------------------------


def load_adapters(sweep_dir: Path, base: Path | None) -> tuple[list[Adapter], list[str]]:
    """The sweep's completed adapters in job order, and notes on what was left out."""
    completed, notes = completed_adapter_jobs(sweep_dir)
    overrides = {d: summary.get("overrides", []) for d, summary in completed}
    swept = swept_keys(sweep_dir, list(overrides.values()))  # as the sweep report finds them
    adapters = []
    for job_dir, summary in completed:
        swept_here = swept_overrides(overrides[job_dir], swept)
        try:
            adapter, note = load_adapter(job_dir, swept_here, seed_of(summary), base)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:  # a damaged adapter
            notes.append(left_out(job_dir, f"its adapter cannot be read ({type(e).__name__}: {e})"))
            continue
        adapters.append(adapter)
        notes += [note] if note else []
    if not adapters:
        raise AnalysisError(no_adapter(sweep_dir, notes))
    return adapters, list(dict.fromkeys(notes))


def load_adapter(job_dir: Path, swept: dict[str, str], seed: int, base: Path | None) -> tuple[Adapter, str | None]:
    from safetensors.torch import load_file

    meta = read_adapter_config(job_dir)
    lora = meta["lora"]
    base_weights, note = base_weights_for(meta, base)
    tensors = load_file(adapter_dir(job_dir) / ADAPTER_WEIGHTS)
    layers = analyze_adapter(tensors, lora_scale(lora["alpha"], lora["rank"], lora["scaling"]), base_weights)
    return Adapter(job=job_dir.name, rank=lora["rank"], seed=seed, setting=setting_label(swept) or "all runs",
                   context=setting_label(swept, leave_out=(SEED_KEY, RANK_KEY)),
                   tensors=tensors, layers=layers), note


def base_weights_for(meta: dict, base: Path | None) -> tuple[dict | None, str | None]:
    """The base model's weights: ``base``, else the base adapter_config.json records; a note if none."""
    if base is not None:
        if not base.is_file():
            raise AnalysisError(f"--base {base} is not a file (expected a base model's .safetensors)")
        return base_file_weights(str(base)), None
    if "base" not in meta:
        return None, ("No base weights: adapter_config.json records no base model (pass --base FILE); "
                      "‖UᵀWV‖_F, amplification and top-r energy share are left out.")
    try:
        return recorded_base_weights(tuple(sorted(meta["base"].items()))), None
    except BaseError as e:
        return None, f"No base weights: {e}; pass --base FILE."


# One load per base, however many runs of the sweep share it.
@cache
def base_file_weights(path: str) -> dict[str, torch.Tensor]:
    return load_base(path)[0].state_dict()


@cache
def recorded_base_weights(identity: tuple) -> dict[str, torch.Tensor]:
    """The base a run recorded (``BaseIdentity.to_dict()``'s items), verified by its hash."""
    return load_recorded_base(dict(identity)).state_dict()


def pick_layers(adapters: list[Adapter], pattern: str | None) -> list[str]:
    names = [row["layer"] for row in adapters[0].layers]
    if pattern is None:
        return names
    try:
        picked = [name for name in names if re.fullmatch(pattern, name)]
    except re.error as e:
        raise AnalysisError(f"--layers {pattern!r} is not a valid regular expression: {e}") from None
    if not picked:
        raise AnalysisError(f"--layers {pattern!r} matches none of the adapted layers: {names}")
    return picked


# --- tables of the per-layer numbers -------------------------------------------------------


def per_run_table(adapters: list[Adapter]) -> str:
    header = ["job", "setting", "seed", *(name for name, _ in LAYER_MEANS)]
    rows = [[a.job, a.setting, a.seed, *(fmt(a.mean(key)) for _, key in LAYER_MEANS)] for a in adapters]
    return "## Per run: means over the adapted layers\n\n" + markdown_table(header, rows)


def per_setting_table(adapters: list[Adapter]) -> str:
    header = ["setting", "seeds", *(name for name, _ in LAYER_MEANS)]
    rows = []
    for setting, runs in group(adapters, lambda a: a.setting).items():
        rows.append([setting, len(runs), *(mean_std([a.mean(key) for a in runs]) for _, key in LAYER_MEANS)])
    return "## Per setting: mean ± std over seeds of the layer means\n\n" + markdown_table(header, rows)


def group(adapters: list[Adapter], key) -> dict[str, list[Adapter]]:
    groups: dict[str, list[Adapter]] = {}
    for a in adapters:
        groups.setdefault(key(a), []).append(a)
    return groups


def fmt(value) -> str:
    return "" if value is None else f"{value:.3g}"


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return fmt(values[0]) if values else ""
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# --- §7.2: subspace similarity ------------------------------------------------------------


def rank_section(adapters: list[Adapter], layers: list[str], sweep_dir: Path) -> list[str]:
    """Figure 3: the smallest rank against the largest, runs of the same setting otherwise.

    Runs of one seed start from the same random numbers, so the first adapted layer's A at the
    smaller rank starts as rows of the larger rank's A: pairs of different seeds keep that
    shared start out of φ, and are used whenever the sweep has them.
    """
    ranks = sorted({a.rank for a in adapters})
    if len(ranks) < 2:
        return ["## Subspace similarity between ranks", "Not computed: the sweep has one rank."]
    low, high = ranks[0], ranks[-1]
    candidates = [(a, b) for a in adapters for b in adapters
                  if a.rank == low and b.rank == high and a.context == b.context]
    pairs = [(a, b) for a, b in candidates if a.seed != b.seed] or candidates
    title = f"Subspace similarity φ(i, j): top-i of r = {low} against top-j of r = {high} (§7.2, Figure 3)"
    if not pairs:
        return [f"## {title}", "Not computed: no run of one rank has the other's seed and setting."]
    name = f"subspace_rank_{low}_vs_{high}.png"
    save_png(plot_similarity(pairs, layers, f"φ(i, j): A of r = {low} (i) against r = {high} (j)"), sweep_dir / name)
    cells = [(1, 1), (1, high), (low, high)]
    text = (f"{pairs_text(pairs)}; 'random' is the expectation for random subspaces, i·j / (d·min(i, j)).")
    if pairs[0][0].seed == pairs[0][1].seed:
        text += (" These runs share their seed, so the first adapted layer's A started from the same random "
                 "rows: its φ is inflated by that shared start.")
    return [f"## {title}", text, similarity_table(pairs, cells), f"![{name}]({name})"]


def seed_sections(adapters: list[Adapter], layers: list[str], sweep_dir: Path) -> list[str]:
    """Figure 4: the adapters of one setting from different seeds, every pair of seeds."""
    parts = []
    for index, (setting, runs) in enumerate(group(adapters, lambda a: a.setting).items()):
        pairs = [(a, b) for a, b in itertools.combinations(runs, 2) if a.seed != b.seed]
        if not pairs:
            continue
        rank = runs[0].rank
        name = f"subspace_seeds_{index}.png"
        save_png(plot_similarity(pairs, layers, f"φ(i, j) between seeds, {setting}"), sweep_dir / name)
        text = (f"Seeds {sorted({a.seed for a in runs})}: {pairs_text(pairs)}; 'random' is the expectation "
                "for random subspaces.")
        parts += [f"## Subspace similarity between seeds: {setting} (§7.2, Figure 4)", text,
                  similarity_table(pairs, [(1, 1), (rank, rank)]), f"![{name}]({name})"]
    return parts or ["## Subspace similarity between seeds", "Not computed: no setting has two seeds."]


def pairs_text(pairs: list[tuple[Adapter, Adapter]]) -> str:
    jobs = ", ".join(f"{a.job}–{b.job}" for a, b in pairs)
    return f"{len(pairs)} pair{'s' * (len(pairs) != 1)} of runs (jobs {jobs}), mean ± std over pairs"


def similarities(pairs: list[tuple[Adapter, Adapter]], layer: str) -> list[torch.Tensor]:
    return [subspace_similarity(a.tensors[f"{layer}.lora_A"], b.tensors[f"{layer}.lora_A"]) for a, b in pairs]


def similarity_table(pairs: list[tuple[Adapter, Adapter]], cells: list[tuple[int, int]]) -> str:
    """φ at ``cells`` per layer and averaged over layers (per pair, then over pairs), beside random."""
    layers = [row["layer"] for row in pairs[0][0].layers]
    grids = {layer: similarities(pairs, layer) for layer in layers}  # layer -> one (r1, r2) grid per pair
    dim = pairs[0][0].tensors[f"{layers[0]}.lora_A"].shape[1]
    header = ["layer", *(f"{name}({i}, {j})" for i, j in cells for name in ("φ", "random"))]
    rows = []
    for layer in [*layers, "mean over layers"]:
        per_pair = grids[layer] if layer in grids else [torch.stack(g).mean(0) for g in zip(*grids.values())]
        rows.append([layer, *(cell for i, j in cells for cell in (
            mean_std([g[i - 1, j - 1].item() for g in per_pair]),
            fmt(random_subspace_similarity(dim, i, j)[-1, -1].item())))])
    return markdown_table(header, rows)


# --- figures --------------------------------------------------------------------------------


def plot_similarity(pairs: list[tuple[Adapter, Adapter]], layers: list[str], title: str):
    """One heat map per layer of φ(i, j), averaged over the pairs (like the paper's Figures 3 and 4)."""
    from matplotlib.figure import Figure  # a bare Figure: Agg, no pyplot state (as report.py)
    from matplotlib.ticker import MaxNLocator

    ncols = min(4, len(layers))
    nrows = -(-len(layers) // ncols)
    figure = Figure(figsize=(3.2 * ncols, 2.8 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        grid = torch.stack(similarities(pairs, layer)).mean(0)  # (r1, r2)
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(layer.removeprefix("transformer."), fontsize="small")
        ax.set_xlabel("j")
        ax.set_ylabel("i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(layers):]:
        ax.set_axis_off()
    figure.colorbar(image, ax=axes.tolist(), label="φ")
    figure.suptitle(f"{title} (mean over {len(pairs)} pairs)")
    return figure


def plot_spectra(adapters: list[Adapter]):
    """σ_k of ΔW against k, one line per rank (mean over layers and runs): absolute and over σ_1."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    absolute, relative = figure.subplots(1, 2)
    for rank, runs in sorted(group(adapters, lambda a: str(a.rank)).items(), key=lambda item: int(item[0])):
        spectra = torch.tensor([row["singular_values"] for a in runs for row in a.layers])  # (layers·runs, r)
        k = range(1, spectra.shape[1] + 1)
        absolute.plot(k, spectra.mean(0), marker=".", label=f"r = {rank}")
        relative.plot(k, (spectra / spectra[:, :1]).mean(0), marker=".", label=f"r = {rank}")
    for ax, ylabel in ((absolute, "σ_k"), (relative, "σ_k / σ_1")):
        ax.set_yscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle("Singular values of ΔW = scale·B·A")
    return figure


def save_png(figure, path: Path) -> None:
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    write_atomic(path, png.getvalue())


def log_to_wandb(sweep_dir: Path, adapters: list[Adapter], figures: list[str]) -> None:
    """The figures as one ``analysis`` run in the W&B group of the sweep's runs, if they logged to W&B."""
    if not any((sweep_dir / a.job / "wandb").is_dir() for a in adapters):
        return
    from loralab.wandb_sweep import sweep_config, sweep_run

    with sweep_run(sweep_dir, sweep_config(sweep_dir), "analysis") as run:
        if run is not None:
            import wandb
            run.log({f"analysis/{name.removesuffix('.png')}": wandb.Image(str(sweep_dir / name)) for name in figures})
