"""QLoRA from scratch (quant.py): NF4 and int8 against independent references."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from loralab.adapters import (
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    load_adapter,
    save_adapter,
    set_adapter,
)
from loralab.lora import LoRAConfig, adapter_names, count_parameters, inject_lora, lora_layers, merge_lora
from loralab.model import GPT, GPTConfig
from loralab.quant import (
    NF4_LEVELS,
    QuantizedLinear,
    bits_per_parameter,
    double_dequantize,
    double_quantize,
    pack_nibbles,
    quantize_linears,
    quantize_nf4,
    quantized_layers,
    unpack_nibbles,
)

from conftest import ADAPTER_CONFIGS, ADAPTER_SCALES, TINY_GPT, load_both, logits, randomize_lora_B, tiny_gpt

# bitsandbytes' NF4 table as published (bitsandbytes/functional.py create_normal_map,
# bitsandbytes/backends/utils.py _NF4_QUANT_TABLE), written out here independently of quant.py.
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
TINY = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


def weights(out=96, inp=80, seed=0):
    """Gaussian weights with a few outliers and rows of very different scale; out·in is not a
    multiple of 64, so the last block is a partial one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-3, 0, out)[:, None]
    w.view(-1)[torch.randint(0, w.numel(), (20,), generator=g)] *= 25
    return w


def text_tokens(length: int) -> torch.Tensor:
    """Real text as bytes: Python's reference documentation, shipped with Python."""
    from pydoc_data.topics import topics

    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[:length]
    return torch.tensor(list(data), dtype=torch.long)


def test_nf4_levels_are_bitsandbytes_table():
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64),
                               torch.tensor(BITSANDBYTES_NF4, dtype=torch.float64), atol=1e-7, rtol=0)


def test_nf4_levels_are_normal_quantiles():
    """QLoRA §3: quantiles of N(0, 1), 8 on the positive side and 7 on the negative (so that 0
    is exact), from probabilities evenly spaced in [0.5, offset], normalised to [-1, 1]."""
    offset = 0.9677083  # bitsandbytes: the largest probability, so that the extreme level is ±1 exactly
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    levels = levels / levels.max()
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels, atol=1e-7, rtol=0)


def test_packing_is_exact_on_every_byte():
    every_byte = torch.arange(256, dtype=torch.uint8)
    codes = unpack_nibbles(every_byte)
    assert codes.tolist() == [n for b in range(256) for n in (b // 16, b % 16)]  # high nibble first
    assert torch.equal(pack_nibbles(codes), every_byte)


def nf4_bound(absmax: torch.Tensor) -> torch.Tensor:
    """Worst case of rounding to the nearest level: absmax × half the widest gap between levels."""
    levels = torch.tensor(BITSANDBYTES_NF4)
    return absmax * (levels[1:] - levels[:-1]).max() / 2


def test_nf4_round_trip_within_each_blocks_bound_and_picks_the_nearest_level():
    w = weights()
    layer = QuantizedLinear(_linear_with(w), "nf4", double_quant=False)
    blocks = F.pad(w.flatten(), (0, -w.numel() % 64)).view(-1, 64)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)
    error = F.pad((layer.dequantize_weight() - w).flatten(), (0, -w.numel() % 64)).abs().view(-1, 64)
    assert torch.all(error.amax(dim=1) <= nf4_bound(absmax) * (1 + 1e-6))
    assert torch.equal(layer.absmax, absmax)
    nearest = (blocks.flatten()[:, None] / absmax.repeat_interleave(64)[:, None]
               - torch.tensor(BITSANDBYTES_NF4)).abs().argmin(dim=1)  # reference: brute force
    assert torch.equal(unpack_nibbles(layer.weight_packed)[:w.numel()].long(), nearest[:w.numel()])


def _linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_double_quantized_constants_and_weights_within_bound():
    w = weights(out=256, inp=128)
    _, absmax = quantize_nf4(w)
    codes, scale, mean = double_quantize(absmax)
    centred = F.pad(absmax - absmax.mean(), (0, -absmax.numel() % 256)).view(-1, 256)
    constant_bound = (centred.abs().amax(dim=1) / 254).repeat_interleave(256)[:absmax.numel()]
    constant_error = (double_dequantize(codes, scale, mean) - absmax).abs()
    assert torch.all(constant_error <= constant_bound * (1 + 1e-5) + 1e-7)
    layer = QuantizedLinear(_linear_with(w), "nf4", double_quant=True)
    # |w - level·c'| <= |w - level·c| + |level|·|c - c'| with |level| <= 1
    bound = (nf4_bound(absmax) + constant_error).repeat_interleave(64)
    assert torch.all((layer.dequantize_weight() - w).abs().flatten() <= bound * (1 + 1e-5) + 1e-7)


def test_int8_round_trip_within_half_a_step_per_output_channel():
    w = weights()
    layer = QuantizedLinear(_linear_with(w), "int8")
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.shape == w.shape
    error = (layer.dequantize_weight() - w).abs().amax(dim=1)
    assert torch.all(error <= w.abs().amax(dim=1) / 127 / 2 * (1 + 1e-6))


@pytest.mark.parametrize("method,double_quant,bits", [
    ("nf4", False, 4 + 32 / 64),
    ("nf4", True, 4 + 8 / 64 + 32 / (64 * 256) + 32 / (768 * 3072)),  # + the one float32 mean
    ("int8", False, 8 + 32 / 768),
])
def test_bits_per_parameter_measured_from_the_buffers(method, double_quant, bits):
    model = nn.Sequential(nn.Linear(768, 3072))
    quantize_linears(model, method, double_quant=double_quant)
    assert bits_per_parameter(model) == pytest.approx(bits, rel=1e-12)


def test_packed_nf4_weight_replaces_the_float_one():
    linear = nn.Linear(768, 768)
    model = nn.Sequential(linear)
    quantize_linears(model, "nf4")
    layer = model[0]
    stored = dict(layer.named_buffers()) | dict(layer.named_parameters())
    assert all(t.numel() < linear.weight.numel() for t in stored.values())  # no (out, in) float tensor left
    assert layer.weight_bytes() <= 0.3 * linear.weight.numel() * 4
    assert count_parameters(model) == (0, 768 * 768 + 768)  # a quantized weight still counts as out × in


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_forward_and_backward_use_the_dequantized_weight_in_the_activations_dtype(method):
    torch.manual_seed(0)
    layer = QuantizedLinear(nn.Linear(80, 48), method)
    W, b = layer.dequantize_weight(), layer.bias
    x = torch.randn(3, 5, 80, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, W, b), atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ W, atol=1e-6, rtol=0)
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16


def test_quantize_linears_leaves_the_head_and_rejects_tied_weights():
    model = GPT(TINY)
    names = quantize_linears(model, "nf4")
    assert "lm_head" not in names and len(names) == 6 * TINY.n_layer
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="lm_head.*tied to"):
        quantize_linears(GPT(TINY), "int8", skip=())
    assert quantize_linears(model, "none") == []
    with pytest.raises(ValueError, match=r"quantize='nf3' is invalid: expected one of \['none', 'int8', 'nf4'\]"):
        quantize_linears(model, "nf3")
    with pytest.raises(ValueError, match="LoRA quantize='fp4' is invalid"):
        LoRAConfig(quantize="fp4")
    with pytest.raises(ValueError, match="already quantized: give inject_lora the float model"):
        inject_lora(model, LoRAConfig(quantize="nf4"))  # its adapter config would not say how


def test_bitsandbytes_quantize_4bit_gives_the_same_codes_and_weights():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    w = weights(out=64, inp=128)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = QuantizedLinear(_linear_with(w), "nf4", double_quant=False)
    assert torch.equal(packed.flatten(), ours.weight_packed)
    assert torch.equal(state.absmax, ours.absmax)
    torch.testing.assert_close(bnb.dequantize_4bit(packed, state), ours.dequantize_weight(), atol=0, rtol=0)
    # with double quantization bitsandbytes codes the constants in its own 8-bit map, we in int8:
    # both must stay within the 4-bit rounding bound plus a small error on the constants
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = QuantizedLinear(_linear_with(w), "nf4", double_quant=True)
    assert torch.equal(packed.flatten(), ours.weight_packed)  # codes come from the exact constants
    spread = bnb.dequantize_4bit(packed, state) - ours.dequantize_weight()
    assert spread.abs().max() <= 0.01 * w.abs().max()


def test_merge_into_a_quantized_base_must_say_dequantize():
    torch.manual_seed(0)
    model = GPT(TINY)
    inject_lora(model, LoRAConfig(rank=4, quantize="nf4"))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    x = text_tokens(64).view(2, 32)
    model.eval()
    unmerged = model(x)[0]
    with pytest.raises(RuntimeError, match="nf4-quantized base: merge\\(dequantize=True\\)"):
        merge_lora(model)
    merge_lora(model, dequantize=True)
    assert all(layer.base_layer is None and layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(x)[0], unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_qlora_training_lowers_the_loss_and_its_adapter_reproduces_the_logits(method, tmp_path):
    torch.manual_seed(0)
    base_state = GPT(TINY).state_dict()
    model = GPT(TINY)
    model.load_state_dict(base_state)
    config = LoRAConfig(rank=8, alpha=16, target_modules="all-linear", quantize=method)
    inject_lora(model, config)
    assert {type(m.base_layer) for m in lora_layers(model).values()} == {QuantizedLinear}
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert total == sum(t.numel() for t in base_state.values()) - TINY.vocab_size * TINY.n_embd + trainable
    data = text_tokens(8 * 64 + 1)
    x, y = data[:-1].view(8, 64), data[1:].view(8, 64)  # one batch of real text, fitted repeatedly
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25  # measured: 5.42 -> 5.01 for nf4

    save_adapter(model, config, tmp_path)
    fresh = GPT(TINY)
    fresh.load_state_dict(base_state)
    assert load_adapter(fresh, tmp_path).quantize == method  # quantized the same way on loading
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x[:4])[0], model(x[:4])[0])


def test_quantized_model_survives_a_copy_and_keeps_no_float_weights():
    model = GPT(TINY)
    inject_lora(model, LoRAConfig(quantize="nf4"))
    clone = copy.deepcopy(model)
    assert set(quantized_layers(clone)) == set(quantized_layers(model))
    float_matrices = {n for n, t in clone.state_dict().items() if t.is_floating_point() and t.dim() == 2}
    assert float_matrices - {n for n in float_matrices if "lora_" in n} == {
        "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}


@pytest.mark.parametrize("overrides,error", [
    (["lora.quantize=fp4"], "LoRA quantize='fp4' is invalid: expected one of ['none', 'int8', 'nf4']"),
    (["lora.quantize=nf4"], None),
    (["lora=full", "lora.quantize=int8"], "lora.quantize='int8' is invalid: expected 'none' with lora.enabled=false")])
def test_config_key_lora_quantize_is_validated(tmp_path, overrides, error):
    from loralab.config import ConfigError, validate

    from conftest import TINY as TINY_OVERRIDES
    from conftest import compose

    cfg = compose([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", *overrides])
    if error is None:
        validate(cfg)  # injects into the model's shape on the meta device, quantization included
        return
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    assert error in str(raised.value)


@pytest.mark.slow
def test_qlora_run_end_to_end(tmp_path, base_cache, capsys):
    from loralab.run import train

    from conftest import TINY as TINY_OVERRIDES
    from conftest import compose

    cfg = compose([*TINY_OVERRIDES, "logger=none", f"paths.cache_dir={base_cache}", f"paths.output_dir={tmp_path}",
                   "lora.quantize=nf4"])
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["status"] == "completed" and metrics["gain/val_loss"] > 0
    assert metrics["lora/merge_ok"]  # merged into the dequantized base, on a copy
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora"]["quantize"] == "nf4"

    from loralab.export import load_finetuned
    from loralab.export import main as export
    from loralab.gpt2 import load_gpt2

    with pytest.raises(SystemExit) as refused:
        export([str(tmp_path), "--peft", str(tmp_path / "peft")])
    assert refused.value.code == 2 and "nf4-quantized" in capsys.readouterr().err
    export([str(tmp_path), "--merged", str(tmp_path / "merged")])  # dequantizes the base
    qlora, merged = load_finetuned(tmp_path)[0].eval(), load_gpt2(tmp_path / "merged").eval()
    assert quantized_layers(qlora) and not quantized_layers(merged)
    x = text_tokens(64).view(2, 32)
    torch.testing.assert_close(merged(x)[0], qlora(x)[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# Many adapters on one quantized base (test_adapters' "a" and "b", trained on the NF4 base)


@pytest.fixture
def saved_nf4(tmp_path):
    """Adapters "a" and "b", each trained (B made non-zero) alone on the NF4-quantized base and saved."""
    directories = {}
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items(), start=1):
        config = dataclasses.replace(config, quantize="nf4")
        model = tiny_gpt()
        inject_lora(model, config)
        randomize_lora_B(model, seed=seed)
        directories[name] = save_adapter(model, config, tmp_path / name)
    return directories


def nf4_base():
    model = tiny_gpt().eval()
    quantize_linears(model, "nf4")
    return model


def test_adapters_on_a_quantized_base_switch_and_disable_exactly(saved_nf4):
    model = load_both(saved_nf4)
    assert len(quantized_layers(model)) == 6 * TINY_GPT.n_layer  # quantized once, by the first adapter
    for name, directory in saved_nf4.items():
        set_adapter(model, name)
        alone = tiny_gpt().eval()
        load_adapter(alone, directory)
        assert torch.equal(logits(model), logits(alone))
    with disable_adapter(model):
        assert torch.equal(logits(model), logits(nf4_base()))


def test_weighted_sum_on_a_quantized_base_is_the_quantized_base_plus_the_weighted_updates(saved_nf4):
    weights = {"a": 0.7, "b": -1.3}
    model = load_both(saved_nf4)
    add_weighted_adapter(model, list(weights), list(weights.values()), "mix")
    set_adapter(model, "mix")
    files = {name: load_file(directory / "adapter.safetensors") for name, directory in saved_nf4.items()}
    x = torch.randn(3, TINY_GPT.n_embd, generator=torch.Generator().manual_seed(0))
    for module_name, layer in lora_layers(model).items():
        delta = sum(w * ADAPTER_SCALES[name] * files[name][f"{module_name}.lora_B"]
                    @ files[name][f"{module_name}.lora_A"]
                    for name, w in weights.items() if f"{module_name}.lora_A" in files[name])
        assert isinstance(layer.base_layer, QuantizedLinear) and layer.lora_A.dtype == torch.float32
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=0)


def test_deleting_every_adapter_gives_back_the_quantized_base(saved_nf4):
    model = load_both(saved_nf4)
    delete_adapter(model, "b")
    delete_adapter(model, "a")
    assert not lora_layers(model) and len(quantized_layers(model)) == 6 * TINY_GPT.n_layer
    assert torch.equal(logits(model), logits(nf4_base()))
    assert count_parameters(model) == (0, sum(p.numel() for p in tiny_gpt().parameters()))


def test_the_adapters_of_one_base_share_its_quantization(saved_nf4):
    model = load_both(saved_nf4)
    with pytest.raises(ValueError, match="adapter 'c' has quantize='none', but this model's base has quantize='nf4'"):
        inject_lora(model, ADAPTER_CONFIGS["a"], adapter_name="c")
    assert adapter_names(model) == ["a", "b"]
    float_model = tiny_gpt()
    inject_lora(float_model, ADAPTER_CONFIGS["a"])
    with pytest.raises(ValueError, match="adapter 'b' has quantize='nf4', but this model's base has quantize='none'"):
        load_adapter(float_model, saved_nf4["b"], name="b")
    assert adapter_names(float_model) == ["default"] and not quantized_layers(float_model)
