"""What the adapters learned: the analyses of the LoRA paper's §7, as diagnostics.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021):

- §7.2 (Figures 3 and 4), subspace similarity: how much of the subspace spanned by
  one adapter's top-i directions lies in another's top-j directions (between ranks,
  between seeds), against what random subspaces of the same sizes share;
- §7.3 (Table 7), ΔW against W: does the update amplify directions W already
  emphasises, and by how much (the amplification factor).

Per adapted layer, with ΔW = scale · B A, also its effective rank (Roy & Vetterli,
"The effective rank: a measure of effective dimensionality", 2007) and stable rank.

Everything is exact, in float64 on the CPU: ΔW's SVD comes from the QR factors of B
and A at O((in + out) · r²), never from the (out × in) product. Depends on torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from loralab.lora import lora_layers

# Per-layer values whose mean over layers is a run's scalar analysis/<name>_mean.
MEANS = ("eff_rank", "stable_rank", "delta_w_norm", "amplification", "top_r_energy_share")


def update_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
    """The thin SVD of ΔW = scale · B A, as (U, S, V) with ΔW = U diag(S) Vᵀ.

    With B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), ΔW = Q_B (scale · R_B R_Aᵀ) Q_Aᵀ,
    so the SVD of the r × r core gives ΔW's: U = Q_B P, V = Q_A Q for core = P S Qᵀ.
    Singular values come in descending order; requires r ≤ min(in, out), as LoRA does.
    """
    A, B = lora_A.detach().cpu().double(), lora_B.detach().cpu().double()  # (r, in), (out, r)
    Q_B, R_B = torch.linalg.qr(B)  # (out, r), (r, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # (in, r), (r, r)
    P, S, Qh = torch.linalg.svd(scale * R_B @ R_A.T)  # (r, r), (r,), (r, r)
    return Q_B @ P, S, Q_A @ Qh.T  # (out, r), (r,), (in, r)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p_k = σ_k / Σσ (Roy & Vetterli 2007): k for k equal singular values,
    between 1 and the rank otherwise. NaN for a zero matrix, where it is undefined."""
    total = singular_values.sum()
    if total == 0:
        return math.nan
    p = singular_values[singular_values > 0] / total  # 0 · log 0 = 0
    return math.exp(-(p * p.log()).sum().item())


def stable_rank(singular_values: torch.Tensor) -> float:
    """‖M‖_F² / ‖M‖_2² = Σσ² / σ_max²: at most the rank, and robust to tiny singular values."""
    top = singular_values.max()
    return (singular_values.square().sum() / top.square()).item() if top > 0 else math.nan


def analyze_update(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                   weight: torch.Tensor | None = None) -> dict:
    """The diagnostics of one adapted layer; those against the frozen ``weight`` W only if given.

    With ΔW = U diag(S) Vᵀ its thin SVD (U: out × r, V: in × r, r the LoRA rank):

    - ``projected_weight_norm`` = ‖Uᵀ W V‖_F, W in ΔW's own r-dimensional subspace (§7.3,
      the paper's ‖UᵀWVᵀ‖_F with V stored as rows); ``projected_weight_norm_random`` =
      r · ‖W‖_F / √(out · in) is its value for random orthonormal U, V (the root of
      E‖Uᵀ W V‖_F² = (r / out)(r / in) ‖W‖_F²), Table 7's "Random" column;
    - ``amplification`` = ‖ΔW‖_F / ‖Uᵀ W V‖_F: how much ΔW amplifies the directions it
      shares with W (the paper: ~21.5 at r = 4, ~1.9 at r = 64 for GPT-3's W_q);
    - ``top_r_energy_share`` = ‖U_Wᵀ ΔW V_W‖_F² / ‖ΔW‖_F², with U_W, V_W W's top-r left and
      right singular vectors: the fraction of ΔW's energy inside the r directions W
      emphasises most (1: ΔW only rescales them; the paper finds it mostly elsewhere);
      ``top_r_energy_share_random`` = r² / (out · in) is its expectation for a ΔW with
      random singular directions, the baseline to read it against.
    """
    return analyze_svd(*update_svd(lora_A, lora_B, scale), scale, weight)


def delta_svd(delta: torch.Tensor):
    """The thin SVD (U, S, V) of a dense update ΔW (out, in), without its numerically zero
    directions: DoRA's and PiSSA's effective updates are not one B A."""
    U, S, Vh = torch.linalg.svd(delta.detach().cpu().double(), full_matrices=False)
    # numerical rank at the precision ΔW was computed in (numpy's matrix_rank tolerance)
    keep = int((S > S.max() * max(delta.shape) * torch.finfo(delta.dtype).eps).sum())
    return U[:, :keep], S[:keep], Vh[:keep].T  # (out, k), (k,), (in, k)


def analyze_svd(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scale: float,
                weight: torch.Tensor | None = None) -> dict:
    """``analyze_update``'s diagnostics from ΔW = U diag(S) Vᵀ."""
    rank = S.numel()
    row = {"rank": rank, "scale": scale, "delta_w_norm": S.norm().item(), "eff_rank": effective_rank(S),
           "stable_rank": stable_rank(S), "singular_values": S.tolist()}
    if weight is None:
        return row
    W = weight.detach().cpu().double()  # (out, in)
    projected = (U.T @ W @ V).norm().item()  # ‖Uᵀ W V‖_F of an (r, r) matrix
    U_W, _, Vh_W = torch.linalg.svd(W, full_matrices=False)
    # U_Wᵀ ΔW V_W = (U_Wᵀ U) diag(S) (Vᵀ V_W): (r, r) products, not the (out, in) ΔW
    in_top_r = (U_W[:, :rank].T @ U) @ torch.diag(S) @ (V.T @ Vh_W[:rank].T)
    out_features, in_features = W.shape
    weight_norm = W.norm().item()
    return {**row, "weight_norm": weight_norm, "projected_weight_norm": projected,
            "projected_weight_norm_random": rank * weight_norm / math.sqrt(out_features * in_features),
            "amplification": row["delta_w_norm"] / projected,
            "top_r_energy_share": (in_top_r.square().sum() / S.square().sum()).item(),
            "top_r_energy_share_random": rank**2 / (out_features * in_features)}


def analyze_model(model: nn.Module) -> list[dict]:
    """One row per ``LoRALinear`` of ``model``: its name and ``analyze_update`` against its frozen W
    (DoRA, PiSSA: of the effective update, merged minus the original W, against that W)."""
    rows = []
    for name, layer in lora_layers(model).items():
        if layer.lora_magnitude is not None or layer.lora_A_init is not None:
            original = layer.original_weight().detach().double()
            rows.append({"layer": name, **analyze_svd(*delta_svd(layer.effective_delta()), layer.scale, original)})
            continue
        # a QLoRA base holds W quantized: the analysis is of the W the layer computes with
        weight = layer.base_weight().detach().double()
        if layer.merged:  # W holds W + ΔW: take the update back out
            weight = weight - layer.delta_weight().double()
        rows.append({"layer": name, **analyze_update(layer.lora_A, layer.lora_B, layer.scale, weight)})
    return rows


def analyze_adapter(tensors: dict[str, torch.Tensor], scale: float,
                    base_weights: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """``analyze_model`` from a saved adapter's tensors (``<module>.lora_A`` / ``.lora_B``, and
    DoRA's / PiSSA's own) and, if given, the base model's state dict (``<module>.weight``)."""
    names = sorted(key.removesuffix(".lora_A") for key in tensors if key.endswith(".lora_A"))
    if base_weights is not None:
        missing = [name for name in names if f"{name}.weight" not in base_weights]
        if missing:
            raise ValueError(f"the base weights do not fit this adapter: no weight for {missing[:5]}")
    return [{"layer": name, **saved_update(tensors, name, scale,
                                           None if base_weights is None else base_weights[f"{name}.weight"])}
            for name in names]


def saved_update(tensors: dict[str, torch.Tensor], name: str, scale: float, weight: torch.Tensor | None) -> dict:
    """``analyze_update`` of the effective update a saved adapter makes to layer ``name``'s original W."""
    A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
    if f"{name}.lora_A_init" in tensors:  # PiSSA: s·(B A − B₀ A₀), of rank up to 2r (less when A = A₀)
        delta = scale * (B.double() @ A.double() - tensors[f"{name}.lora_B_init"].double()
                         @ tensors[f"{name}.lora_A_init"].double())
        return analyze_svd(*delta_svd(delta), scale, weight)
    if f"{name}.lora_magnitude" not in tensors:
        return analyze_update(A, B, scale, weight)
    if weight is None:
        raise ValueError(f"the DoRA update of {name!r} depends on the base weight W, which is not available: "
                         f"analyze it with its base")
    W = weight.detach().cpu().double()  # (out, in)
    merged = W + scale * B.double() @ A.double()
    delta = merged * (tensors[f"{name}.lora_magnitude"].double() / merged.norm(dim=1))[:, None] - W
    return analyze_svd(*delta_svd(delta), scale, W)


def layer_means(rows: list[dict]) -> dict[str, float]:
    """analysis/<name>_mean over layers, for each of ``MEANS`` the rows hold."""
    return {f"analysis/{name}_mean": math.fsum(row[name] for row in rows) / len(rows)
            for name in MEANS if rows and name in rows[0]}


# --- §7.2: subspace similarity ---------------------------------------------------


def right_singular_vectors(lora_A: torch.Tensor) -> torch.Tensor:
    """The columns of V in A = U S Vᵀ, most important first: (in, r), A's directions in the
    layer's input space, which the paper compares (Figure 3: U_A is A's right-singular matrix)."""
    _, _, Vh = torch.linalg.svd(lora_A.detach().cpu().double(), full_matrices=False)
    return Vh.T


def subspace_similarity(lora_A1: torch.Tensor, lora_A2: torch.Tensor) -> torch.Tensor:
    """The §7.2 grid φ(A₁, A₂, i, j) = ‖V₁,ᵢᵀ V₂,ⱼ‖_F² / min(i, j), for i ≤ r₁, j ≤ r₂.

    V_k,ᵢ are the top-i right singular vectors of the k-th adapter's A (r_k × in), so
    φ is of A, not of ΔW: 1 when one top subspace contains the other, 0 when they are
    orthogonal. Entry [i - 1, j - 1] is φ at (i, j).
    """
    overlap = (right_singular_vectors(lora_A1).T @ right_singular_vectors(lora_A2)).square()  # (r1, r2)
    captured = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖V₁,ᵢᵀ V₂,ⱼ‖_F²
    i, j = index_grid(*captured.shape)
    return captured / torch.minimum(i, j)


def random_subspace_similarity(dim: int, rank1: int, rank2: int) -> torch.Tensor:
    """E[φ] for uniformly random subspaces of ℝ^dim: i · j / (dim · min(i, j)), as a grid like
    ``subspace_similarity``'s (E‖V_iᵀ V_j‖_F² = i · j / dim for random V_i, V_j)."""
    i, j = index_grid(rank1, rank2)
    return i * j / (dim * torch.minimum(i, j))


def index_grid(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """i = 1..rows as a column and j = 1..cols as a row, to broadcast into a (rows, cols) grid."""
    i = torch.arange(1, rows + 1, dtype=torch.float64)[:, None]  # (rows, 1)
    j = torch.arange(1, cols + 1, dtype=torch.float64)[None, :]  # (1, cols)
    return i, j
