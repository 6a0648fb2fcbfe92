"""PEFT LoRA adapters for Hugging Face's GPT-2, written and read without ``peft``.

A PEFT LoRA on a Conv1D stores lora_A (r, in) and lora_B (out, r) exactly as ours
(fan_in_fan_out only transposes the merged delta), so the adapter is a renaming plus,
for q/k/v, one fused LoRA on ``c_attn`` (below). ``peft`` is the reference the tests
check against.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loralab.files import atomic_path
from loralab.gpt2 import CONV1D, HF_NAME, OUR_NAME, QKV, in_block
from loralab.lora import LoRAConfig, LoRALinear, find_targets, lora_layers
from loralab.model import GPT
from loralab.quant import quantization
from loralab.surgery import replace_module

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
METADATA_KEY = "loralab"  # our layout, kept in the safetensors header, where PEFT ignores it

# PEFT options that change what a LoRA layer computes or add weights beyond lora_A / lora_B
PEFT_UNSUPPORTED = ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "alora_invocation_tokens", "arrow_config",
                    "velora_config", "monteclora_config", "kasa_config", "modules_to_save",
                    "trainable_token_indices", "layer_replication", "target_parameters")

# A PEFT LoRA on a Conv1D stores lora_A (r, in) and lora_B (out, r) exactly as ours
# (fan_in_fan_out only transposes the merged delta). o_proj, fc_in and fc_out map one
# to one. LoRAs on q/k/v become one LoRA on c_attn: its A stacks theirs, its B places
# each B in its own rows and its own columns, zero elsewhere:
#
#     A = [A_q; A_v]   (2r, C)        B = [[B_q, 0], [0, 0], [0, B_v]]   (3C, 2r)
#
# so B A = [B_q A_q; 0; B_v A_v], exactly. The fused rank is the sum of the ranks, and
# alpha_pattern gives c_attn the alpha that keeps the scale: alpha·m (standard) or
# alpha·sqrt(m) (rsLoRA) for m adapted projections of rank r. One difference remains in
# training only: PEFT draws one dropout mask for c_attn where we draw one per projection.


def export_peft_adapter(model: GPT, lora_config: LoRAConfig, directory: str | Path,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA of a GPT-2-shaped ``model`` as a PEFT adapter for Hugging Face's GPT-2.

    ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names, so that
    ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), directory)`` computes
    what our unmerged model computes. ``lora_config`` gives PEFT's global r / lora_alpha /
    lora_dropout / use_rslora; modules whose rank or alpha differ (a fused c_attn) get
    ``rank_pattern`` / ``alpha_pattern`` entries. Our per-projection layout travels in the
    safetensors header (PEFT ignores it), so ``import_peft_adapter`` restores it.

    A model with a quantized base (QLoRA) is refused: on Hugging Face's float GPT-2 its
    adapter would compute something else; ``save_merged_gpt2`` exports it dequantized.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export: inject_lora(model, config) first")
    if quantization(model) != "none":
        raise ValueError(f"the model's base is {quantization(model)}-quantized (lora.quantize): a PEFT adapter goes "
                         f"onto Hugging Face's float GPT-2, where this adapter computes something else; export "
                         f"the merged model instead (`python -m loralab.export RUN --merged OUT` dequantizes the base)")
    wrong = sorted(name for name, layer in layers.items() if layer.scaling != lora_config.scaling)
    if wrong:
        raise ValueError(f"LoRA layers {wrong[:3]} do not use lora_config.scaling={lora_config.scaling!r}: "
                         f"a PEFT adapter has one use_rslora")
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(_hf_module(name), []).append(name)
    tensors, ranks, alphas = {}, {}, {}
    for hf_name, names in groups.items():
        parts = [(name, layers[name]) for name in sorted(names, key=_qkv_order)]
        A, B, ranks[hf_name], alphas[hf_name] = _fuse(hf_name, parts, model.config.n_embd)
        tensors[f"{PEFT_PREFIX}{hf_name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{hf_name}.lora_B.weight"] = B
        if lora_config.dora:
            tensors[f"{PEFT_PREFIX}{hf_name}.lora_magnitude_vector"] = _fused_magnitude(model, hf_name, parts)
    modules = {name: [layer.rank, layer.alpha] for name, layer in sorted(layers.items())}
    layout = {"lora": asdict(lora_config), "modules": modules}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / PEFT_WEIGHTS) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", METADATA_KEY: json.dumps(layout)})
    if lora_config.init == "pissa":  # exported as the rank-2r LoRA on the original base (_peft_factors)
        factor = 2 if lora_config.scaling == "standard" else math.sqrt(2)
        lora_config = replace(lora_config, rank=2 * lora_config.rank, alpha=lora_config.alpha * factor, init="kaiming")
    peft_config = _peft_config(lora_config, ranks, alphas, model.config.n_layer, base_model_name_or_path)
    (directory / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory


def _hf_module(name: str) -> str:
    """Our Linear -> the GPT-2 Conv1D holding it: ``transformer.h.0.attn.q_proj`` -> ``...attn.c_attn``."""
    block, module = in_block(name)
    if module not in HF_NAME:
        raise ValueError(f"LoRA on {name!r} has no place in a GPT-2 PEFT adapter: only the block Linears "
                         f"{sorted(HF_NAME)} map onto GPT-2's Conv1D modules")
    return f"{block}.{HF_NAME[module]}"


def _our_modules(hf_name: str) -> list[str]:
    """A GPT-2 Conv1D -> our Linears it holds (q, k, v for c_attn)."""
    block, module = in_block(hf_name)
    if module not in CONV1D:
        raise ValueError(f"a LoRA on {hf_name!r} cannot be imported: loralab maps only GPT-2's block modules "
                         f"{list(CONV1D)}")
    return [f"{block}.{name}" for name in (QKV if module == "attn.c_attn" else [OUR_NAME[module]])]


def _qkv_order(name: str) -> int:
    module = in_block(name)[1]
    return QKV.index(module) if module in QKV else 0


def _rows(name: str, n_embd: int) -> slice:
    """The rows of its Conv1D's output that ``name`` computes: q, k, v are thirds of c_attn's."""
    i = _qkv_order(name)
    return slice(i * n_embd, (i + 1) * n_embd) if in_block(name)[1] in QKV else slice(None)


def _peft_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """A layer's LoRA as PEFT holds it on the original base: (A, B, rank, alpha). PiSSA's
    becomes a rank-2r LoRA as PEFT converts it (``path_initial_model_for_weight_conversion``):
    W_res + s·B A = W + s·(B A − B₀ A₀) = W + s·[B, −B₀] [A; A₀], at the alpha keeping s."""
    if layer.lora_A_init is None:
        return layer.lora_A, layer.lora_B, layer.rank, layer.alpha
    alpha = layer.alpha * (2 if layer.scaling == "standard" else math.sqrt(2))
    return (torch.cat([layer.lora_A, layer.lora_A_init]), torch.cat([layer.lora_B, -layer.lora_B_init], dim=1),
            2 * layer.rank, alpha)


@torch.no_grad()
def _fuse(hf_name: str, parts: list[tuple[str, LoRALinear]], n_embd: int):
    """One PEFT LoRA (A, B, rank, alpha) that computes the sum of ``parts``' LoRAs, in q, k, v order."""
    factors = [_peft_factors(layer) for _, layer in parts]
    (_, _, r, first_alpha), m = factors[0], len(parts)
    if any((rank, alpha) != (r, first_alpha) for _, _, rank, alpha in factors):
        raise ValueError(f"LoRAs {[name for name, _ in parts]} differ in rank or alpha: their fused "
                         f"{hf_name} adapter has one scale")
    out_features = 3 * n_embd if hf_name.endswith("c_attn") else parts[0][1].out_features
    A = torch.cat([A for A, _, _, _ in factors])  # (m·r, in)
    B = A.new_zeros(out_features, m * r)  # (out, m·r)
    for i, ((name, _), (_, B_part, _, _)) in enumerate(zip(parts, factors)):
        B[_rows(name, n_embd), i * r:(i + 1) * r] = B_part
    # the scale alpha / r (or alpha / sqrt(r)) at the fused rank m·r
    alpha = first_alpha * (m if parts[0][1].scaling == "standard" else math.sqrt(m))
    return A, B, m * r, alpha


@torch.no_grad()
def _fused_magnitude(model: GPT, hf_name: str, parts: list[tuple[str, LoRALinear]]) -> torch.Tensor:
    """DoRA's magnitude for the fused Conv1D: each part's own, and ‖W‖ for the rows of a
    projection it does not adapt (its direction is W itself, so m / ‖W‖ = 1 there)."""
    adapted = dict(parts)
    return torch.cat([adapted[name].lora_magnitude if name in adapted else model.get_submodule(name).weight.norm(dim=1)
                      for name in _our_modules(hf_name)])  # (out,)


def _peft_config(config: LoRAConfig, ranks: dict[str, int], alphas: dict[str, float], n_layer: int,
                 base_model_name_or_path: str | None) -> dict:
    names = _peft_names({name: (ranks[name], alphas[name]) for name in ranks}, n_layer)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.scaling == "rslora", "use_dora": config.dora,
        "target_modules": sorted(set(names.values())),
        "rank_pattern": {names[n]: r for n, r in sorted(ranks.items()) if r != config.rank},
        "alpha_pattern": {names[n]: a for n, a in sorted(alphas.items()) if a != config.alpha},
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights (in, out)
        "bias": "none", "init_lora_weights": True, "inference_mode": True,
    }


def _peft_names(modules: dict[str, tuple[int, float]], n_layer: int) -> dict[str, str]:
    """How the PEFT config names each module: ``attn.c_attn`` when every block adapts it with one
    rank and alpha, else its full name. Both select exactly the intended modules, in target_modules
    (a suffix match) and in rank/alpha_pattern (``re.match(rf"(.*\\.)?({key})$", name)``)."""
    by_suffix: dict[str, list[tuple[int, float]]] = {}
    for name, rank_alpha in modules.items():
        by_suffix.setdefault(in_block(name)[1], []).append(rank_alpha)
    uniform = {s for s, values in by_suffix.items() if len(values) == n_layer and len(set(values)) == 1}
    return {name: in_block(name)[1] if in_block(name)[1] in uniform else name for name in modules}


def import_peft_adapter(model: GPT, directory: str | Path) -> LoRAConfig:
    """Load a PEFT LoRA adapter for Hugging Face's GPT-2 into our GPT (a base without LoRA), exactly.

    An adapter from ``export_peft_adapter`` comes back as the per-projection LoRAs it was
    exported from, under its own LoRAConfig. Any other (trained with PEFT, or ours trained
    further there) may have a dense c_attn B, which no rank-r q/k/v LoRAs reproduce; then
    each of q_proj, k_proj, v_proj gets a LoRA of c_attn's full rank holding c_attn's A and
    its own third of B's rows — exact, for 1.5× c_attn's adapter parameters. The config
    returned then has PEFT's global r and lora_alpha; a module under PEFT's rank_pattern /
    alpha_pattern keeps its own in its LoRALinear (``layer.rank``, ``layer.alpha``).
    """
    directory = Path(directory)
    peft = _read_peft_config(directory)
    fused = _read_peft_weights(directory)
    layout = _exported_layout(directory)
    plan = _split_as_exported(fused, layout["modules"], model.config.n_embd) if layout else None
    if plan is not None:
        config = LoRAConfig(**layout["lora"])
    else:
        plan = _split_full_rank(fused, peft, model.config.n_embd)
        config = LoRAConfig(rank=peft["r"], alpha=peft["lora_alpha"], dropout=peft.get("lora_dropout", 0.0),
                            target_modules=_targets(model, list(plan)),
                            scaling="rslora" if peft.get("use_rslora") else "standard")
    _wrap(model, plan, config, directory)
    return config


def _read_peft_config(directory: Path) -> dict:
    path = directory / PEFT_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory} is not a PEFT adapter: it has no {PEFT_CONFIG}")
    peft = json.loads(path.read_text())
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={peft.get('peft_type')!r} is not supported: only 'LORA'")
    unsupported = {key: peft[key] for key in PEFT_UNSUPPORTED if peft.get(key)}
    if peft.get("bias", "none") != "none":
        unsupported["bias"] = peft["bias"]
    init = peft.get("init_lora_weights", True)
    if not isinstance(init, bool) and init != "gaussian":  # PiSSA, OLoRA, LoftQ ... also change the base weights
        unsupported["init_lora_weights"] = init
    if unsupported:
        raise ValueError(f"{path}: {unsupported} not supported: loralab imports plain LoRA adapters "
                         f"(lora_A, lora_B on an unchanged base)")
    return peft


def _read_peft_weights(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{GPT-2 module name: (lora_A (r, in), lora_B (out, r))}."""
    path = directory / PEFT_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{directory} has no {PEFT_WEIGHTS} (an adapter_model.bin: load and re-save it with PEFT)")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise ValueError(f"{path}: {key!r} is not a lora_A / lora_B weight of a GPT2LMHeadModel adapter")
        weights.setdefault(m.group(1), {})[m.group(2)] = value
    incomplete = sorted(name for name, ab in weights.items() if len(ab) != 2)
    if incomplete:
        raise ValueError(f"{path}: modules {incomplete[:3]} lack lora_A or lora_B")
    return {name: (ab["A"], ab["B"]) for name, ab in weights.items()}


def _exported_layout(directory: Path) -> dict | None:
    with safe_open(directory / PEFT_WEIGHTS, framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None


def _split_as_exported(fused: dict, modules: dict[str, list], n_embd: int) -> dict | None:
    """Undo ``_fuse`` with the exported layout; None if B is no longer block-shaped (trained on as one)."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(_hf_module(name), []).append(name)
    if groups.keys() != fused.keys():
        return None
    plan = {}
    for hf_name, names in groups.items():
        A, B = fused[hf_name]
        rebuilt, col = torch.zeros_like(B), 0
        for name in sorted(names, key=_qkv_order):
            rank, alpha = modules[name]
            rows, cols = _rows(name, n_embd), slice(col, col + rank)
            plan[name] = (rank, alpha, A[cols], B[rows, cols])
            rebuilt[rows, cols] = B[rows, cols]
            col += rank
        if col != A.shape[0] or not torch.equal(rebuilt, B):
            return None
    return plan


def _split_full_rank(fused: dict, peft: dict, n_embd: int) -> dict:
    """Each of our Linears in a Conv1D gets its full-rank LoRA: the same A, its own rows of B."""
    plan = {}
    for hf_name, (A, B) in fused.items():
        alpha = _pattern_value(peft.get("alpha_pattern") or {}, hf_name, peft["lora_alpha"])
        for name in _our_modules(hf_name):
            plan[name] = (A.shape[0], alpha, A, B[_rows(name, n_embd)])
    return plan


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targets(model: nn.Module, names: list[str]) -> list[str] | str:
    """target_modules selecting exactly ``names``: leaf names if they do, else a regex of the full names."""
    leaves = sorted({name.rsplit(".", 1)[1] for name in names})
    if set(find_targets(model, leaves)) == set(names):
        return leaves
    return "|".join(re.escape(name) for name in sorted(names))


def _wrap(model: nn.Module, plan: dict, config: LoRAConfig, directory: Path) -> None:
    """Freeze ``model`` and put a LoRALinear holding ``plan``'s (rank, alpha, A, B) on each named Linear.

    Checks everything first, so a failure leaves the model unchanged.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: import a PEFT adapter into a base model")
    for name, (rank, _, A, B) in plan.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            base = None
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{directory}: the adapter adapts {name!r}, which is no nn.Linear of this model")
        if A.shape != (rank, base.in_features) or B.shape != (base.out_features, rank):
            raise ValueError(f"{directory}: the LoRA for {name!r} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                             f"this model needs ({rank}, {base.in_features}) and ({base.out_features}, {rank})")
    model.requires_grad_(False)
    for name, (rank, alpha, A, B) in plan.items():
        layer = LoRALinear(model.get_submodule(name), rank=rank, alpha=alpha, dropout=config.dropout,
                           scaling=config.scaling, init=config.init)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        replace_module(model, name, layer)
