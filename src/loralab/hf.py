"""Hugging Face GPT-2 checkpoints and PEFT adapters, read and written without transformers or peft.

GPT-2 as Hugging Face stores it differs from our GPT in two ways only:
- its Linears are ``Conv1D``: weights stored (in, out), the transpose of ``nn.Linear``;
- attention has one fused ``c_attn`` (in -> 3·in, output rows ``[q | k | v]``)
  where we have ``q_proj, k_proj, v_proj``.

So a checkpoint is a key-for-key copy with transposes and a three-way split, and a
PEFT adapter on ``c_attn`` is one LoRA whose output rows cover q, k and v. The core
needs torch and safetensors only; ``transformers``/``peft`` are the references the
tests check against (and ``tokenizers`` reads a tokenizer when a directory holds one).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loralab.lora import LoRAConfig, LoRALinear, find_targets, lora_layers, merge_lora, replace_module
from loralab.model import GPT, GPTConfig

CONFIG = "config.json"
# in order of preference; an index file names the shards of a large checkpoint
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
METADATA_KEY = "loralab"  # our layout, kept in the safetensors header, where PEFT ignores it

# our Linear -> the Conv1D holding it, names relative to a block
HF_NAME = {"attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
           "attn.o_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # c_attn's output rows, in this order
OURS = {hf: ours for ours, hf in HF_NAME.items() if ours not in QKV}  # the one-to-one Conv1Ds
CONV1D = ("attn.c_attn", *OURS)

# GPT2Config's defaults, which a config.json may leave out
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "tie_word_embeddings": True, "model_type": "gpt2", "activation_function": "gelu_new",
                 "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "add_cross_attention": False}
# GPT-2 options our GPT computes only at these values
SUPPORTED = {
    "model_type": {"gpt2"},
    "activation_function": {"gelu_new", "gelu_pytorch_tanh"},  # both the tanh-approximate GELU
    "layer_norm_epsilon": {1e-5},  # nn.LayerNorm's default, which our GPT uses
    "scale_attn_weights": {True},
    "scale_attn_by_inverse_layer_idx": {False},
    "add_cross_attention": {False},
}

# PEFT options that change what a LoRA layer computes or add weights beyond lora_A / lora_B
PEFT_UNSUPPORTED = ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "alora_invocation_tokens", "arrow_config",
                    "velora_config", "monteclora_config", "kasa_config", "modules_to_save",
                    "trainable_token_indices", "layer_replication", "target_parameters")


# ---------------------------------------------------------------------------
# GPT-2 checkpoints


def read_gpt2_config(directory: str | Path, dropout: float = 0.0) -> GPTConfig:
    """The ``GPTConfig`` a Hugging Face GPT-2 ``config.json`` describes."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ValueError(f"{directory} is not a Hugging Face GPT-2 checkpoint: it has no {CONFIG}")
    hf = {**GPT2_DEFAULTS, **json.loads(path.read_text())}
    for key, allowed in SUPPORTED.items():
        if hf[key] not in allowed:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported: loralab's GPT computes {sorted(allowed)}")
    if hf["n_inner"] not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{path}: n_inner={hf['n_inner']} is not supported: loralab's MLP is 4 * n_embd wide")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True,
                     tie_weights=hf["tie_word_embeddings"])


def load_gpt2(directory: str | Path, dropout: float = 0.0) -> GPT:
    """Load a local Hugging Face GPT-2 directory (any size) into our GPT.

    Reads ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (or their
    sharded ``.index.json`` forms), with or without the ``transformer.`` key prefix.
    Tensors keep the checkpoint's dtype. ``dropout`` is ours to choose: GPT-2's three
    ``*_pdrop`` values are a training choice, not part of the weights.
    """
    directory = Path(directory)
    config = read_gpt2_config(directory, dropout)
    state = _from_hf(_read_weights(directory))
    if config.tie_weights and "transformer.wte.weight" in state:  # one tensor, as GPT-2 saves it once
        state["lm_head.weight"] = state["transformer.wte.weight"]
    with torch.device("meta"):  # no time spent on a random init the checkpoint overwrites
        model = GPT(config)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{directory}: the weights do not fit its {CONFIG}: {e}") from None
    if config.tie_weights:  # assign=True replaced wte's Parameter; share the new one again
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_file(directory / shard).items()}
        return _read_file(path)
    raise ValueError(f"{directory} holds no GPT-2 weights: expected one of {list(WEIGHTS)}")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 keys and layouts -> ours."""
    ours = {}
    for key, value in hf.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if key != "lm_head.weight" and not key.startswith("transformer."):  # GPT2Model checkpoints
            key = "transformer." + key
        module_name, _, param = key.rpartition(".")
        block, module = _in_block(module_name)
        if module not in CONV1D:  # embeddings, LayerNorms and the head share our names
            ours[key] = value
            continue
        if param == "weight":
            value = value.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        if module == "attn.c_attn":
            for name, part in zip(QKV, value.chunk(3, dim=0)):
                ours[f"{block}.{name}.{param}"] = part.contiguous()
        else:
            ours[f"{block}.{OURS[module]}.{param}"] = value.contiguous()
    return ours


def _in_block(name: str) -> tuple[str, str]:
    """``transformer.h.0.attn.q_proj`` -> (``transformer.h.0``, ``attn.q_proj``); ("", name) outside the blocks."""
    m = re.fullmatch(r"(transformer\.h\.\d+)\.(.+)", name)
    return m.groups() if m else ("", name)


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights under ``GPT2LMHeadModel``'s keys and layouts (the inverse of ``load_gpt2``).

    LoRA layers must be merged: an unmerged layer's weight alone is not what the model computes.
    """
    if not model.config.bias:
        raise ValueError("GPT-2 has biases in every Linear and LayerNorm: a GPT with bias=False "
                         "has no GPT-2 checkpoint form")
    unmerged = [name for name, layer in lora_layers(model).items() if not layer.merged]
    if unmerged:
        raise ValueError(f"LoRA layers {unmerged[:3]} are not merged: merge_lora(model) first, "
                         f"or use save_merged_gpt2")
    ours = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    if model.config.tie_weights:
        del ours["lm_head.weight"]  # GPT-2 ties it to wte, as we do
    hf = {}
    for key, value in ours.items():
        module_name, _, param = key.rpartition(".")
        block, module = _in_block(module_name)
        if module not in HF_NAME:
            hf[key] = value
            continue
        if module in QKV[1:]:  # written with q_proj, into the one c_attn
            continue
        if module == QKV[0]:
            value = torch.cat([ours[f"{block}.{name}.{param}"] for name in QKV], dim=0)  # (3C, C) or (3C,)
        hf[f"{block}.{HF_NAME[module]}.{param}"] = (value.t() if param == "weight" else value).contiguous()
    return hf


def gpt2_config(config: GPTConfig) -> dict:
    """A Hugging Face ``config.json`` for our GPT's sizes."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "tie_word_embeddings": config.tie_weights,
        # GPT-2's <|endoftext|> is its last token (50256); keep the convention for other vocabularies
        "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
    }


def save_merged_gpt2(model: GPT, directory: str | Path) -> Path:
    """Write ``model`` with its LoRA merged as a plain GPT-2 directory that ``transformers`` loads.

    Merges a copy, so the caller's model stays unmerged and bit-for-bit unchanged.
    """
    merged = copy.deepcopy(model)
    merge_lora(merged)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in gpt2_state_dict(merged).items()}
    save_file(tensors, directory / WEIGHTS[0], metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(gpt2_config(model.config), indent=2) + "\n")
    return directory


def load_gpt2_tokenizer(directory: str | Path):
    """The GPT-2 tokenizer saved in ``directory`` as a ``tokenizers.Tokenizer``, or None if it holds none.

    ``tokenizer.json`` is read by ``tokenizers`` alone; a directory with only the older
    ``vocab.json`` + ``merges.txt`` is converted by ``transformers``, from disk.
    """
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True).backend_tokenizer
    return None


# ---------------------------------------------------------------------------
# PEFT adapters
#
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
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export: inject_lora(model, config) first")
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
    layout = {"lora": asdict(lora_config), "modules": {n: [l.rank, l.alpha] for n, l in sorted(layers.items())}}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, directory / PEFT_WEIGHTS,
              metadata={"format": "pt", METADATA_KEY: json.dumps(layout)})
    peft_config = _peft_config(lora_config, ranks, alphas, model.config.n_layer, base_model_name_or_path)
    (directory / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory


def _hf_module(name: str) -> str:
    """Our Linear -> the GPT-2 Conv1D holding it: ``transformer.h.0.attn.q_proj`` -> ``...attn.c_attn``."""
    block, module = _in_block(name)
    if module not in HF_NAME:
        raise ValueError(f"LoRA on {name!r} has no place in a GPT-2 PEFT adapter: only the block Linears "
                         f"{sorted(HF_NAME)} map onto GPT-2's Conv1D modules")
    return f"{block}.{HF_NAME[module]}"


def _our_modules(hf_name: str) -> list[str]:
    """A GPT-2 Conv1D -> our Linears it holds (q, k, v for c_attn)."""
    block, module = _in_block(hf_name)
    if module not in CONV1D:
        raise ValueError(f"a LoRA on {hf_name!r} cannot be imported: loralab maps only GPT-2's block modules "
                         f"{list(CONV1D)}")
    return [f"{block}.{name}" for name in (QKV if module == "attn.c_attn" else [OURS[module]])]


def _qkv_order(name: str) -> int:
    module = _in_block(name)[1]
    return QKV.index(module) if module in QKV else 0


def _rows(name: str, n_embd: int) -> slice:
    """The rows of its Conv1D's output that ``name`` computes: q, k, v are thirds of c_attn's."""
    i = _qkv_order(name)
    return slice(i * n_embd, (i + 1) * n_embd) if _in_block(name)[1] in QKV else slice(None)


@torch.no_grad()
def _fuse(hf_name: str, parts: list[tuple[str, LoRALinear]], n_embd: int):
    """One PEFT LoRA (A, B, rank, alpha) that computes the sum of ``parts``' LoRAs, in q, k, v order."""
    (_, first), m = parts[0], len(parts)
    if any((layer.rank, layer.alpha) != (first.rank, first.alpha) for _, layer in parts):
        raise ValueError(f"LoRAs {[name for name, _ in parts]} differ in rank or alpha: their fused "
                         f"{hf_name} adapter has one scale")
    r = first.rank
    out_features = 3 * n_embd if hf_name.endswith("c_attn") else first.out_features
    A = torch.cat([layer.lora_A for _, layer in parts])  # (m·r, in)
    B = A.new_zeros(out_features, m * r)  # (out, m·r)
    for i, (name, layer) in enumerate(parts):
        B[_rows(name, n_embd), i * r:(i + 1) * r] = layer.lora_B
    # the scale alpha / r (or alpha / sqrt(r)) at the fused rank m·r
    alpha = first.alpha * (m if first.scaling == "standard" else math.sqrt(m))
    return A, B, m * r, alpha


def _peft_config(config: LoRAConfig, ranks: dict[str, int], alphas: dict[str, float], n_layer: int,
                 base_model_name_or_path: str | None) -> dict:
    names = _peft_names({name: (ranks[name], alphas[name]) for name in ranks}, n_layer)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.scaling == "rslora",
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
        by_suffix.setdefault(_in_block(name)[1], []).append(rank_alpha)
    uniform = {s for s, values in by_suffix.items() if len(values) == n_layer and len(set(values)) == 1}
    return {name: _in_block(name)[1] if _in_block(name)[1] in uniform else name for name in modules}


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
    for name, (rank, alpha, A, B) in plan.items():
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
        layer = LoRALinear(model.get_submodule(name), rank, alpha, config.dropout, config.scaling, config.init)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        replace_module(model, name, layer)
