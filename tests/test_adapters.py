"""Many adapters on one base (lora.py): load, switch, disable, combine, delete."""

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from loralab.adapters import (
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    load_adapter,
    lora_state_dict,
    save_adapter,
    set_adapter,
)
from loralab.lora import (
    LoRALinear,
    active_adapter,
    adapter_names,
    count_parameters,
    inject_lora,
    lora_layers,
    merge_lora,
)

from conftest import ADAPTER_CONFIGS, ADAPTER_SCALES, load_both, logits, randomize_lora_B, tiny_gpt, tokens


@pytest.fixture
def saved(tmp_path):
    """Adapters "a" and "b", each trained (B made non-zero) alone on the same base and saved."""
    directories = {}
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items(), start=1):
        model = tiny_gpt()
        inject_lora(model, config)
        randomize_lora_B(model, seed=seed)
        directories[name] = save_adapter(model, config, tmp_path / name)
    return directories


def alone(directory):
    """The base with only this adapter loaded: what the adapter computes by itself."""
    model = tiny_gpt().eval()
    load_adapter(model, directory)
    return model


def test_switching_reproduces_each_adapter_alone_exactly(saved):
    model = load_both(saved)
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "a"  # the first one loaded
    expected = {name: logits(alone(directory)) for name, directory in saved.items()}
    assert not torch.equal(expected["a"], expected["b"])
    for name in ["a", "b", "a", "b"]:
        set_adapter(model, name)
        assert active_adapter(model) == name
        assert torch.equal(logits(model), expected[name]), name


def test_disabled_is_the_base_exactly_and_switches_back(saved):
    model, base = load_both(saved), tiny_gpt().eval()
    with disable_adapter(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), logits(alone(saved["a"])))
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"), disable_adapter(model):
        pass


def test_weighted_sum_of_one_adapter_with_weight_one_equals_it(saved):
    model = load_both(saved)
    add_weighted_adapter(model, ["a"], [1.0], "a_again")
    set_adapter(model, "a_again")
    # a's scale is 2: folding it into B is exact, so this is the very same computation
    assert torch.equal(logits(model), logits(alone(saved["a"])))
    add_weighted_adapter(model, ["b"], [1.0], "b_again")
    set_adapter(model, "b_again")
    torch.testing.assert_close(logits(model), logits(alone(saved["b"])), atol=1e-6, rtol=1e-6)


def test_weighted_sum_of_two_is_w_plus_the_weighted_updates(saved):
    weights = {"a": 0.7, "b": -1.3}
    model = load_both(saved)
    adapted = add_weighted_adapter(model, list(weights), list(weights.values()), "mix")
    files = {name: load_file(directory / "adapter.safetensors") for name, directory in saved.items()}
    base = dict(tiny_gpt().named_parameters())
    set_adapter(model, "mix")
    merge_lora(model)
    layers = lora_layers(model)
    assert sorted(adapted) == sorted(layers) == sorted(
        {k.rsplit(".", 1)[0] for f in files.values() for k in f})  # the union of a's and b's layers
    for module_name, layer in layers.items():
        by_hand = base[f"{module_name}.weight"].detach().clone()
        ranks = 0
        for name, w in weights.items():
            if f"{module_name}.lora_A" in files[name]:
                A, B = files[name][f"{module_name}.lora_A"], files[name][f"{module_name}.lora_B"]
                by_hand += w * ADAPTER_SCALES[name] * B @ A
                ranks += ADAPTER_CONFIGS[name].rank
        assert layer.rank == ranks  # q_proj: 4 + 2, k_proj: 4, fc_in: 2
        torch.testing.assert_close(layer.weight, by_hand, atol=1e-6, rtol=0)


def test_gradients_reach_only_the_active_adapter(saved):
    model = load_both(saved).train()
    set_adapter(model, "b")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    idx = tokens(seed=3)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    b_layers = ["transformer.h.0.attn.q_proj", "transformer.h.0.mlp.fc_in",
                "transformer.h.1.attn.q_proj", "transformer.h.1.mlp.fc_in"]
    assert with_grad == sorted(f"{layer}.lora_{m}" for layer in b_layers for m in "AB")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_parked" in n)
    optimizer.step()
    set_adapter(model, "a")  # training b left a exactly as it was
    assert torch.equal(logits(model.eval()), logits(alone(saved["a"])))


def test_delete_removes_the_adapter_and_its_parameters(saved):
    model = load_both(saved)
    total = count_parameters(model)[1]
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert not [n for n in model.state_dict() if ".b." in n]
    C = 32  # tiny_gpt's n_embd: b adapts q_proj (C -> C) and fc_in (C -> 4C) in 2 blocks at rank 2
    assert count_parameters(model)[1] == total - 2 * 2 * ((C + C) + (C + 4 * C))
    assert type(model.transformer.h[0].mlp.fc_in) is nn.Linear  # b was its only adapter
    assert torch.equal(logits(model), logits(alone(saved["a"])))
    delete_adapter(model, "a")  # the last one: the base again, key for key
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == tiny_gpt().state_dict().keys()
    assert torch.equal(logits(model), logits(tiny_gpt().eval()))


def test_the_active_adapter_is_deleted_only_when_last(saved):
    model = load_both(saved)
    with pytest.raises(ValueError, match=r"'a' is active: set_adapter\(model, one of \['b'\]\)"):
        delete_adapter(model, "a")
    assert adapter_names(model) == ["a", "b"]


def test_later_adapters_wait_frozen_and_keep_the_first_ones_keys(saved):
    model = tiny_gpt()
    inject_lora(model, ADAPTER_CONFIGS["a"])
    keys = set(model.state_dict())
    trainable = count_parameters(model)[0]
    inject_lora(model, ADAPTER_CONFIGS["b"], adapter_name="b")
    assert active_adapter(model) == "default"
    assert keys <= set(model.state_dict())  # "default" keeps loralib's keys: ...q_proj.lora_A
    assert count_parameters(model)[0] == trainable  # only the active adapter trains
    assert sorted(lora_state_dict(model, "b")) == sorted(load_file(saved["b"] / "adapter.safetensors"))


def test_an_adapter_saved_while_active_reloads_exactly(saved, tmp_path):
    model = load_both(saved)
    set_adapter(model, "b")
    save_adapter(model, ADAPTER_CONFIGS["b"], tmp_path / "b_again")
    assert torch.equal(logits(alone(tmp_path / "b_again")), logits(alone(saved["b"])))


def test_an_adapter_from_another_base_fails_with_one_line(tmp_path):
    model = tiny_gpt()
    inject_lora(model, ADAPTER_CONFIGS["a"])
    save_adapter(model, ADAPTER_CONFIGS["a"], tmp_path / "a", base={"kind": "cache", "sha256": "1" * 64})
    target = tiny_gpt()
    with pytest.raises(ValueError) as error:
        load_adapter(target, tmp_path / "a", expected_base_sha256="2" * 64)
    message = str(error.value)
    assert "\n" not in message and f"sha256={'1' * 64}, not on this base (sha256={'2' * 64})" in message
    assert not adapter_names(target)  # nothing changed
    assert load_adapter(target, tmp_path / "a", expected_base_sha256="1" * 64) == ADAPTER_CONFIGS["a"]


def test_an_adapter_without_a_recorded_base_loads(saved):
    model = tiny_gpt()
    load_adapter(model, saved["a"], expected_base_sha256="2" * 64)  # an unknown base: allowed
    assert adapter_names(model) == ["default"]


def test_a_failed_load_leaves_the_adapters_as_they_were(saved, tmp_path):
    model = load_both(saved)
    state = copy.deepcopy(model.state_dict())
    other = tiny_gpt(n_embd=64)
    inject_lora(other, ADAPTER_CONFIGS["b"])
    save_adapter(other, ADAPTER_CONFIGS["b"], tmp_path / "wide")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(model, tmp_path / "wide", name="wide")
    assert adapter_names(model) == ["a", "b"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name,message", [("a", "already exists"), ("x.y", "invalid"), ("keys", "invalid")])
def test_bad_adapter_names_are_refused(saved, name, message):
    with pytest.raises(ValueError, match=message):
        inject_lora(load_both(saved), ADAPTER_CONFIGS["a"], adapter_name=name)


def test_unknown_adapters_list_the_ones_held(saved):
    model = load_both(saved)
    with pytest.raises(ValueError, match=r"no adapter 'c' in this model: it holds \['a', 'b'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="one weight per adapter"):
        add_weighted_adapter(model, ["a", "b"], [1.0], "mix")
