"""Hugging Face GPT-2 checkpoints, read and written without ``transformers``.

GPT-2 as Hugging Face stores it differs from our GPT in two ways only:
- its Linears are ``Conv1D``: weights stored (in, out), the transpose of ``nn.Linear``;
- attention has one fused ``c_attn`` (in -> 3·in, output rows ``[q | k | v]``)
  where we have ``q_proj, k_proj, v_proj``.

So a checkpoint is a key-for-key copy with transposes and a three-way split. Needs
torch and safetensors only; ``transformers`` is the reference the tests check against.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loralab.files import atomic_path
from loralab.lora import lora_layers, merge_and_unload
from loralab.model import GPT, GPTConfig
from loralab.quant import quantization, quantized_layers

CONFIG = "config.json"
# in order of preference; an index file names the shards of a large checkpoint
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# our Linear -> the Conv1D holding it, names relative to a block
HF_NAME = {"attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
           "attn.o_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # c_attn's output rows, in this order
OUR_NAME = {hf: ours for ours, hf in HF_NAME.items() if ours not in QKV}  # the Conv1Ds that are one Linear of ours
CONV1D = ("attn.c_attn", *OUR_NAME)

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
        block, module = in_block(module_name)
        if module not in CONV1D:  # embeddings, LayerNorms and the head share our names
            ours[key] = value
            continue
        if param == "weight":
            value = value.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        if module == "attn.c_attn":
            for name, part in zip(QKV, value.chunk(3, dim=0)):
                ours[f"{block}.{name}.{param}"] = part.contiguous()
        else:
            ours[f"{block}.{OUR_NAME[module]}.{param}"] = value.contiguous()
    return ours


def in_block(name: str) -> tuple[str, str]:
    """``transformer.h.0.attn.q_proj`` -> (``transformer.h.0``, ``attn.q_proj``); ("", name) outside the blocks."""
    m = re.fullmatch(r"(transformer\.h\.\d+)\.(.+)", name)
    return m.groups() if m else ("", name)


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights under ``GPT2LMHeadModel``'s keys and layouts (the inverse of ``load_gpt2``).

    LoRA layers must be merged: an unmerged layer's weight alone is not what the model computes.
    Quantized Linears (QLoRA) must be dequantized: a GPT-2 checkpoint holds float weights.
    """
    if not model.config.bias:
        raise ValueError("GPT-2 has biases in every Linear and LayerNorm: a GPT with bias=False "
                         "has no GPT-2 checkpoint form")
    quantized = list(quantized_layers(model))
    if quantized:
        raise ValueError(f"Linears {quantized[:3]} are quantized: merge_and_unload(model, dequantize=True) first, "
                         f"or use save_merged_gpt2")
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
        block, module = in_block(module_name)
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


def save_merged_gpt2(model: GPT, directory: str | Path, dequantize: bool = False) -> Path:
    """Write ``model`` with its LoRA merged as a plain GPT-2 directory that ``transformers`` loads.

    Merges a copy, so the caller's model stays unmerged and bit-for-bit unchanged. A
    quantized (QLoRA) base needs ``dequantize=True``: the checkpoint then holds its float32
    dequantization plus scale · B A, what the QLoRA model computes, in full precision.
    """
    if quantization(model) != "none" and not dequantize:
        raise ValueError(f"the model's base is {quantization(model)}-quantized and a GPT-2 checkpoint holds float "
                         f"weights: save_merged_gpt2(model, directory, dequantize=True) writes its dequantization")
    merged = merge_and_unload(copy.deepcopy(model), dequantize=dequantize)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in gpt2_state_dict(merged).items()}
    with atomic_path(directory / WEIGHTS[0]) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(gpt2_config(model.config), indent=2) + "\n")
    return directory
