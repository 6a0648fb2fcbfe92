"""LoRA+, DoRA and PiSSA (lora.py, variants.py): the papers' formulas by hand, identity at
init, merges, and parity with PEFT 0.21's own implementations on the same GPT."""

import copy
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn as nn

from loralab.adapters import add_weighted_adapter, delete_adapter, load_adapter, save_adapter
from loralab.config import ConfigError, validate
from loralab.lora import (
    LoRAConfig,
    LoRALinear,
    analytic_lora_parameters,
    count_parameters,
    inject_lora,
    lora_layers,
    merge_lora,
    unmerge_lora,
)
from loralab.variants import lora_plus_param_groups, pissa_factors

from conftest import compose, tiny_gpt, tokens

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "fc_in"]


def randomize(model, seed=1):
    """Non-zero B (and a magnitude away from ‖W‖ for DoRA), so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude.shape, generator=g))


# ---------------------------------------------------------------------------
# DoRA


def test_dora_layer_matches_the_formula_worked_by_hand():
    # W = [[3, 0], [0, 4]], A = [[1, 0]], B = [[1], [0]], scale = alpha / r = 1:
    # W + s·B·A = [[4, 0], [0, 4]], row norms [4, 4]; m = [2, 8] gives W' = [[2, 0], [0, 8]]
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    layer = LoRALinear(base, rank=1, alpha=1, dora=True)
    torch.testing.assert_close(layer.lora_magnitude.detach(), torch.tensor([3.0, 4.0]))  # ‖W‖ per output
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0], [0.0]]))
        layer.lora_magnitude.copy_(torch.tensor([2.0, 8.0]))
    expected = torch.tensor([[2.0, 0.0], [0.0, 8.0]])
    torch.testing.assert_close(layer(torch.tensor([[1.0, 1.0]])), torch.tensor([[2.0, 8.0]]))
    torch.testing.assert_close(layer.merged_weight(), expected)
    torch.testing.assert_close(layer.effective_delta(), expected - base.weight)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_starts_as_the_base_and_merges_exactly(dropout):
    base = tiny_gpt()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4, target_modules=TARGETS, dora=True, dropout=dropout))
    model.eval()
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], base(idx)[0], atol=1e-6, rtol=0)
    randomize(model)
    unmerged = model(idx)[0]
    assert (unmerged - base(idx)[0]).abs().max() > 1e-3
    weights = {name: layer.weight.clone() for name, layer in lora_layers(model).items()}
    merge_lora(model)
    torch.testing.assert_close(model(idx)[0], unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight, weights[name], atol=1e-6, rtol=0)
    trainable, _ = count_parameters(model)  # r·(in + out) + out per layer
    assert trainable == analytic_lora_parameters(model) == sum(
        4 * (m.in_features + m.out_features) + m.out_features for m in lora_layers(model).values())


def dora_twins(seed=0):
    """Our DoRA and PEFT's use_dora on copies of one GPT, holding the same A, B and magnitude."""
    base = tiny_gpt(seed)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(rank=4, alpha=5, target_modules=TARGETS, dora=True))
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=5, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            twin = theirs.base_model.model.get_submodule(name)
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
            twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return base, ours, theirs


def test_dora_outputs_gradients_and_merge_match_peft():
    base, ours, theirs = dora_twins()
    idx, targets = tokens(1), tokens(2)
    logits, loss = ours(idx, targets)
    peft_logits, peft_loss = theirs(idx, targets)
    assert (logits - base(idx)[0]).abs().max() > 1e-3
    torch.testing.assert_close(logits, peft_logits, atol=1e-5, rtol=0)
    loss.backward()
    peft_loss.backward()
    for name, layer in lora_layers(ours).items():
        twin = theirs.base_model.model.get_submodule(name)
        for ours_p, theirs_p in ((layer.lora_A, twin.lora_A["default"].weight),
                                 (layer.lora_B, twin.lora_B["default"].weight),
                                 (layer.lora_magnitude, twin.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=1e-6, rtol=1e-4)
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, merged.get_submodule(name).weight, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# PiSSA


def test_pissa_factors_worked_by_hand():
    # W = diag(9, 1), r = 1, scale 4: the top singular pair is (9, e₁, e₁), so
    # A = √(9/4)·e₁ᵀ = [[1.5, 0]], B = [[1.5], [0]], scale·B·A = diag(9, 0), residual diag(0, 1)
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.diag(torch.tensor([9.0, 1.0])))
    A, B = pissa_factors(base.weight, 1, 4.0)
    sign = A[0, 0].sign()  # the SVD may flip a singular pair
    torch.testing.assert_close(A * sign, torch.tensor([[1.5, 0.0]]))
    torch.testing.assert_close(B * sign, torch.tensor([[1.5], [0.0]]))
    layer = LoRALinear(base, rank=1, alpha=4, init="pissa")
    torch.testing.assert_close(layer.weight.detach(), torch.diag(torch.tensor([0.0, 1.0])), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(torch.tensor([[1.0, 1.0]])), torch.tensor([[9.0, 1.0]]))


def test_pissa_starts_as_the_base_and_equals_peft_init_up_to_signs():
    base = tiny_gpt()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(rank=4, alpha=5, target_modules=TARGETS, init="pissa"))
    idx = tokens()
    torch.testing.assert_close(ours(idx)[0], base(idx)[0], atol=1e-5, rtol=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=5, target_modules=TARGETS, init_lora_weights="pissa"))
    for name, layer in lora_layers(ours).items():
        twin = theirs.base_model.model.get_submodule(name)
        A, B = twin.lora_A["default"].weight, twin.lora_B["default"].weight
        signs = (layer.lora_A * A).sum(dim=1).sign()  # (r,): one sign per singular pair
        torch.testing.assert_close(layer.lora_A * signs[:, None], A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B * signs, B, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.weight, twin.base_layer.weight, atol=1e-5, rtol=0)  # the residual


def test_pissa_effective_delta_and_delete_give_back_the_base():
    base = tiny_gpt()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4, target_modules=TARGETS, init="pissa"))
    init = {name: layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
            for name, layer in lora_layers(model).items()}
    randomize(model)
    for name, layer in lora_layers(model).items():
        expected = layer.scale * layer.lora_B @ layer.lora_A - init[name]  # s·(B A − B₀ A₀)
        torch.testing.assert_close(layer.effective_delta(), expected, atol=1e-5, rtol=0)
    delete_adapter(model, "default")
    torch.testing.assert_close(model(tokens())[0], base(tokens())[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [dict(dora=True), dict(init="pissa"), dict(init="pissa", dora=True)],
                         ids=["dora", "pissa", "pissa+dora"])
def test_saved_variant_adapter_reproduces_the_model_on_the_recorded_base(tmp_path, config):
    base = tiny_gpt()
    model = copy.deepcopy(base)
    lora_config = LoRAConfig(rank=4, target_modules=TARGETS, **config)
    inject_lora(model, lora_config)
    randomize(model)
    save_adapter(model, lora_config, tmp_path)
    loaded = copy.deepcopy(base)
    assert load_adapter(loaded, tmp_path) == lora_config
    idx = tokens()
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=1e-6, rtol=0)
    for name, layer in lora_layers(loaded).items():
        torch.testing.assert_close(layer.weight, lora_layers(model)[name].weight, atol=0, rtol=0)


def test_pissa_and_dora_adapters_refuse_what_is_not_defined():
    model = tiny_gpt()
    inject_lora(model, LoRAConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match=r"a PiSSA adapter is the model's only one: cannot add 'b' beside "
                                         r"\['default'\]"):
        inject_lora(model, LoRAConfig(rank=2), adapter_name="b")
    dora = tiny_gpt()
    inject_lora(dora, LoRAConfig(rank=2, dora=True))
    inject_lora(dora, LoRAConfig(rank=2), adapter_name="plain")
    with pytest.raises(ValueError, match=r"\['default'\] are DoRA or PiSSA adapters"):
        add_weighted_adapter(dora, ["default", "plain"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match=r"^LoRA init='pissa' is invalid: expected kaiming or gaussian with "
                                         r"quantize='nf4'"):
        LoRAConfig(init="pissa", quantize="nf4")
    with pytest.raises(ValueError, match=r"^LoRA rank=40 is larger than min\(in, out\)=32"):
        inject_lora(tiny_gpt(), LoRAConfig(rank=40, init="pissa"))


# ---------------------------------------------------------------------------
# LoRA+


def test_lora_plus_groups_equal_peft_create_loraplus_optimizer():
    from peft.optimizers import create_loraplus_optimizer

    model = tiny_gpt()  # DoRA's magnitude (1-D) and a LayerNorm trained in full test the groups' edges
    inject_lora(model, LoRAConfig(rank=4, target_modules=TARGETS, dora=True, modules_to_save=["ln_f"]))
    lr, ratio, decay = 1e-3, 16.0, 0.1
    ours = lora_plus_param_groups(model, lr, ratio, decay)
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                       loraplus_weight_decay=decay).param_groups
    as_sets = [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in ours]
    assert as_sets == [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in theirs if g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    b_group = {names[i].rsplit(".", 1)[-1] for i in as_sets[1][0]}
    assert as_sets[1][1] == ratio * lr and b_group == {"lora_B", "lora_magnitude"}  # independent of PEFT
    assert {names[i] for i in as_sets[2][0]} == {"transformer.ln_f.weight", "transformer.ln_f.bias"}


# ---------------------------------------------------------------------------
# The config: bad combinations, one line each, before any work


@pytest.mark.parametrize("overrides,line", [
    (["lora=full", "lora.dora=true"], "lora.dora=True is invalid: expected false with lora.enabled=false"),
    (["optim.lora_plus_ratio=0"], "optim.lora_plus_ratio=0.0 is invalid: expected a finite number > 0"),
    (["optim.lora_plus_ratio=-16"], "optim.lora_plus_ratio=-16.0 is invalid: expected a finite number > 0"),
    (["lora=full", "optim.lora_plus_ratio=16"], "optim.lora_plus_ratio=16.0 is invalid: expected 1 with "
                                                "lora.enabled=false"),
    (["lora.init=pissa", "lora.rank=4096"], "lora: LoRA rank=4096 is larger than min(in, out)"),
    (["lora.init=pissa", "lora.quantize=nf4"], "lora: LoRA init='pissa' is invalid: expected kaiming or gaussian "
                                               "with quantize='nf4'"),
])
def test_bad_variant_combinations_fail_in_one_line(tmp_path, overrides, line):
    cfg = compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    [only] = str(error.value).splitlines()
    assert only.startswith(line), only
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()



def test_adapter_analysis_reads_the_effective_update_of_each_variant():
    from loralab.analysis import analyze_model

    for config in (LoRAConfig(rank=2, dora=True), LoRAConfig(rank=2, init="pissa")):
        model = tiny_gpt()
        inject_lora(model, config)
        randomize(model)
        rows = analyze_model(model)
        for row, layer in zip(rows, lora_layers(model).values()):
            delta = layer.effective_delta().double()
            assert math.isclose(row["delta_w_norm"], delta.norm().item(), rel_tol=1e-6)
            assert math.isclose(row["weight_norm"], layer.original_weight().double().norm().item(), rel_tol=1e-6)
        if config.init == "pissa":  # s·(B A − B₀ A₀) has rank at most 2r
            assert all(row["rank"] <= 4 for row in rows)


def test_saved_variant_adapters_analyze_as_the_live_model(tmp_path):
    """loralab.analyze reads adapters from disk: the effective update there equals the live layer's."""
    from safetensors.torch import load_file

    from loralab.analysis import analyze_adapter, analyze_model

    for config in (LoRAConfig(rank=2, dora=True), LoRAConfig(rank=2, init="pissa")):
        base = tiny_gpt()
        model = copy.deepcopy(base)
        inject_lora(model, config)
        randomize(model)
        save_adapter(model, config, tmp_path / config.init)
        saved = analyze_adapter(load_file(tmp_path / config.init / "adapter.safetensors"), config.scale,
                                base.state_dict())
        for row, live in zip(saved, analyze_model(model)):
            for key in ("delta_w_norm", "weight_norm", "amplification"):
                assert math.isclose(row[key], live[key], rel_tol=1e-4), (config, key, row[key], live[key])


@pytest.mark.slow
def test_a_killed_variant_run_resumed_equals_an_uninterrupted_one(tmp_path, base_cache):
    """DoRA's magnitude and LoRA+'s groups in the checkpoint, PiSSA's residual rebuilt from
    the base: a resumed run ends with the same metrics and the same adapter file."""
    from conftest import RESUMABLE, TIMINGS, kill_at_first_checkpoint, read_summary, run_train, start_train

    args = [*RESUMABLE, f"paths.cache_dir={base_cache}", "logger=none", "lora.dora=true", "lora.init=pissa",
            "optim.lora_plus_ratio=16"]
    run_train([*args, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    killed = tmp_path / "killed"
    assert kill_at_first_checkpoint(start_train([*args, f"hydra.run.dir={killed}"], tmp_path),
                                    killed / "checkpoints/last.ckpt") == 6
    run_train([*args, f"hydra.run.dir={killed}", "resume=true"], cwd=tmp_path)
    whole, resumed = read_summary(tmp_path / "whole"), read_summary(killed)
    assert resumed["status"] == whole["status"] == "completed"
    assert {k: v for k, v in resumed["metrics"].items() if k not in TIMINGS} == \
           {k: v for k, v in whole["metrics"].items() if k not in TIMINGS}
    assert whole["metrics"]["lora/merge_max_abs_diff"] < 1e-4  # the merge check ran on the variant
    adapter = "adapter/adapter.safetensors"
    assert (killed / adapter).read_bytes() == (tmp_path / "whole" / adapter).read_bytes()
