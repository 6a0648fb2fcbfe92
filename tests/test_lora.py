"""Invariants of the from-scratch LoRA (lora.py)."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from loralab.adapters import load_adapter, load_lora_state_dict, lora_state_dict, save_adapter
from loralab.lora import (
    LoRAConfig,
    LoRALinear,
    analytic_lora_parameters,
    count_parameters,
    inject_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

from conftest import TINY_GPT, randomize_lora_B, tiny_gpt, tokens


@pytest.mark.parametrize("scaling,expected_scale", [("standard", 16 / 4), ("rslora", 16 / 2)])
def test_layer_matches_hand_computed_formula(scaling, expected_scale):
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=16, scaling=scaling)
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    x = torch.randn(3, 10)
    by_hand = x @ W.T + b + expected_scale * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), by_hand, atol=1e-5, rtol=0)
    assert layer.scale == expected_scale


def test_fresh_layer_computes_the_base_and_keeps_its_weights():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    x = torch.randn(4, 8)
    expected = base(x).detach()
    layer = LoRALinear(base, rank=2, alpha=4)
    assert torch.equal(layer(x), expected)
    assert layer.weight is base.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) == 0


def test_gaussian_init_and_dropout_identity_at_zero():
    layer = LoRALinear(nn.Linear(64, 64), rank=8, alpha=8, init="gaussian")
    assert isinstance(layer.lora_dropout, nn.Identity)
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.02  # PEFT's gaussian: std 1/r
    assert isinstance(LoRALinear(nn.Linear(4, 4), rank=2, alpha=2, dropout=0.1).lora_dropout, nn.Dropout)


def test_fresh_injected_gpt_equals_base():
    base = tiny_gpt()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4, target_modules="all-linear"))
    idx = tokens()
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_merge_matches_unmerged_is_idempotent_and_unmerge_restores():
    model = tiny_gpt().eval()
    inject_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "fc_in"]))
    randomize_lora_B(model)
    W_before = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)[0]
        merge_lora(model)
        merged = model(idx)[0]
        merged_weights = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
        merge_lora(model)  # a second merge changes nothing
    assert (merged - unmerged).abs().max() <= 1e-5
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.weight, merged_weights[name])
        expected = W_before[name] + layer.scale * layer.lora_B @ layer.lora_A  # W + scale·B·A
        torch.testing.assert_close(layer.weight, expected, atol=1e-6, rtol=0)
    unmerge_lora(model)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert (layer.weight - W_before[name]).abs().max() <= 1e-6
        assert not layer.merged


def test_training_while_merged_is_an_error():
    layer = LoRALinear(nn.Linear(4, 4), rank=2, alpha=2)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()(torch.randn(1, 4))
    with torch.no_grad():  # inference on a merged layer is fine
        layer(torch.randn(1, 4))


def test_merge_and_unload_gives_plain_linears_with_the_same_outputs():
    model = tiny_gpt().eval()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj", "o_proj"]))
    randomize_lora_B(model)
    idx = tokens()
    with torch.no_grad():
        expected = model(idx)[0]
        merge_and_unload(model)
        assert not lora_layers(model)
        assert type(model.transformer.h[0].attn.q_proj) is nn.Linear
        assert (model(idx)[0] - expected).abs().max() <= 1e-5


def test_only_lora_gets_gradients_and_base_stays_bit_identical():
    model = tiny_gpt().train()
    inject_lora(model, LoRAConfig(rank=4, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        idx = tokens(seed=step)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in with_grad)
        optimizer.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", r"transformer\.h\.1\..*"])
def test_trainable_count_equals_analytic_count(targets):
    model = tiny_gpt()
    total_before = count_parameters(model)[1]
    adapted = inject_lora(model, LoRAConfig(rank=3, target_modules=targets))
    C = TINY_GPT.n_embd
    shapes = {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "o_proj": (C, C),
              "fc_in": (C, 4 * C), "fc_out": (4 * C, C)}
    by_hand = sum(3 * sum(shapes[name.rsplit(".", 1)[-1]]) for name in adapted)
    trainable, total = count_parameters(model)
    assert trainable == by_hand == analytic_lora_parameters(model)
    assert total == total_before + by_hand


def test_targeting_by_names_regex_and_all_linear():
    def names(targets):
        return inject_lora(tiny_gpt(), LoRAConfig(rank=2, target_modules=targets))

    assert names(["q_proj", "v_proj"]) == [f"transformer.h.{i}.attn.{p}" for i in range(2)
                                           for p in ("q_proj", "v_proj")]
    assert names(r".*\.h\.1\.mlp\..*") == ["transformer.h.1.mlp.fc_in", "transformer.h.1.mlp.fc_out"]
    all_linear = names("all-linear")
    assert len(all_linear) == 2 * 6 and "lm_head" not in all_linear


def test_injection_into_a_plain_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(5, 12)
    expected = mlp(x).detach()
    adapted = inject_lora(mlp, LoRAConfig(rank=2, target_modules=["0", "2"]))
    assert adapted == ["0", "2"] and torch.equal(mlp(x), expected)
    assert count_parameters(mlp)[0] == 2 * (12 + 32) + 2 * (32 + 32)
    mlp(x).sum().backward()
    assert mlp[4].weight.grad is None and mlp[0].lora_A.grad is not None


def test_no_match_error_lists_real_linear_names():
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*transformer\.h\.0\.attn\.q_proj"):
        inject_lora(tiny_gpt(), LoRAConfig(target_modules=["query"]))


def test_rank_larger_than_a_layer_names_the_layer():
    mlp = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"rank=4 .*min\(in, out\)=2 of layer '1'"):
        inject_lora(mlp, LoRAConfig(rank=4, target_modules="all-linear"))
    assert type(mlp[0]) is nn.Linear and mlp[0].weight.requires_grad  # nothing changed


def test_tied_output_head_is_refused():
    model = tiny_gpt()  # lm_head.weight is transformer.wte.weight
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to \['transformer.wte.weight'\]"):
        inject_lora(model, LoRAConfig(rank=2, target_modules=["lm_head"]))
    untied = tiny_gpt(tie_weights=False)
    assert inject_lora(untied, LoRAConfig(rank=2, target_modules=["lm_head"])) == ["lm_head"]


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -2), ("rank", 2.5), ("alpha", 0), ("alpha", -1.0), ("dropout", 1.0),
    ("dropout", -0.1), ("target_modules", []), ("target_modules", "("), ("scaling", "sqrt"), ("init", "xavier"),
])
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LoRAConfig(**{field: value})


def test_unknown_choices_list_the_allowed_values():
    with pytest.raises(ValueError, match=r"\['standard', 'rslora'\]"):
        LoRAConfig(scaling="sqrt")
    with pytest.raises(ValueError, match=r"\['kaiming', 'gaussian', 'pissa'\]"):
        LoRAConfig(init="xavier")


def test_adapter_save_load_roundtrip(tmp_path):
    config = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "fc_out"], scaling="rslora")
    model = tiny_gpt().eval()
    inject_lora(model, config)
    randomize_lora_B(model)
    save_adapter(model, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora"]["scaling"] == "rslora"

    fresh = tiny_gpt().eval()  # the same base weights, new process-style
    assert load_adapter(fresh, tmp_path) == config
    idx = tokens()
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_adapter_into_another_shape_fails_clearly(tmp_path):
    config = LoRAConfig(rank=4, target_modules=["q_proj"])
    model = tiny_gpt()
    inject_lora(model, config)
    save_adapter(model, config, tmp_path)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 32\), the model expects \(4, 64\)"):
        load_adapter(tiny_gpt(n_embd=64), tmp_path)
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter(tiny_gpt(n_layer=3), tmp_path)


def test_lora_state_dict_holds_only_adapters():
    model = tiny_gpt()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["k_proj"]))
    sd = lora_state_dict(model)
    assert sorted(sd) == [f"transformer.h.{i}.attn.k_proj.lora_{m}" for i in range(2) for m in "AB"]
    with pytest.raises(ValueError, match="unexpected keys"):
        load_lora_state_dict(model, {**sd, "extra.lora_A": torch.zeros(1)})


def test_scale_standard_and_rslora():
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, scaling="rslora").scale == 32 / math.sqrt(16)


def test_bf16_base_keeps_lora_in_float32_and_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    x = torch.randn(64, 16).to(torch.bfloat16)
    expected_base = base(x).detach()
    layer = LoRALinear(base[0], rank=4, alpha=8)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert torch.equal(layer(x), expected_base)
    twin_layer = twin.base_model.model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        twin_layer.lora_A["default"].weight.copy_(layer.lora_A)
        twin_layer.lora_B["default"].weight.copy_(layer.lora_B)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, twin(x))  # PEFT: float32 LoRA path, cast back once
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


def test_safe_merge_refuses_nan_and_inf_and_leaves_the_weight():
    model = tiny_gpt()
    inject_lora(model, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    layer = model.transformer.h[1].attn.v_proj
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"adapter 'default' into Linear\(32 -> 32\) gives NaN/inf"):
        layer.merge(safe=True)
    with pytest.raises(ValueError,
                       match=r"into 'transformer.h.1.attn.v_proj' gives NaN/inf weights: nothing was merged"):
        merge_lora(model, safe=True)
    assert not any(m.merged for m in lora_layers(model).values())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n.endswith(".weight"))
    layer.merge()  # unsafe: the inf goes in, as the check predicted
    assert not torch.isfinite(layer.weight).all()


def test_a_disabled_layer_computes_the_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    x = torch.randn(4, 8)
    expected = base(x).detach()
    layer = LoRALinear(base, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), expected)
    layer.disabled = True
    assert torch.equal(layer(x), expected)
