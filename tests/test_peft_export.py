"""Adapters that travel (peft_adapter.py, gpt2.py): ours -> PEFT on Hugging Face's GPT-2, PEFT -> ours, and merged GPT-2
checkpoints, each checked against transformers + peft computing the same logits."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download: every checkpoint here is built by the test
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_hf_gpt2

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loralab.adapters import lora_state_dict
from loralab.gpt2 import gpt2_state_dict, load_gpt2, save_merged_gpt2
from loralab.lora import LoRAConfig, inject_lora, lora_layers
from loralab.peft_adapter import PEFT_WEIGHTS, export_peft_adapter, import_peft_adapter
from loralab.quant import quantized_layers

TINY = dict(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=2)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out"]
# q/v and k alone fuse into c_attn (rank 2r and r); the regex adapts q, v in block 0 and k in block 1 only
CASES = [
    dict(target_modules=["q_proj", "v_proj"], rank=4, scaling="standard"),
    dict(target_modules=["q_proj", "v_proj"], rank=4, scaling="rslora"),
    dict(target_modules=["k_proj"], rank=2, scaling="rslora"),
    dict(target_modules=ALL, rank=3, scaling="rslora"),
    dict(target_modules="all-linear", rank=2, scaling="standard"),
    dict(target_modules=r"transformer\.h\.0\.attn\.[qv]_proj|transformer\.h\.1\.attn\.k_proj", rank=2,
         scaling="rslora"),
]
IDS = ["qv", "qv-rslora", "k-rslora", "all-rslora", "all-linear", "per-block-regex"]


@pytest.fixture
def gpt2_dir(tmp_path_factory, request):
    """A random tiny GPT-2 saved by transformers, biases and LayerNorms off their init."""
    model = tiny_hf_gpt2(**TINY, tie_word_embeddings=getattr(request, "param", True))
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    return directory


def hf_gpt2(directory):
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


def our_lora_gpt2(directory, config, seed=1):
    """Our GPT from ``directory`` with LoRA whose B is random: B = 0 would make every check vacuous."""
    model = load_gpt2(directory)
    inject_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model.eval()


def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, TINY["n_positions"]), generator=torch.Generator().manual_seed(3))


def logits_of(model):
    with torch.no_grad():
        out = model(tokens())
    return out.logits if hasattr(out, "logits") else out[0]


def assert_close(actual, expected, changed_from=None):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    if changed_from is not None:  # the LoRA must matter, or matching proves nothing
        assert (expected - changed_from).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exported_adapter_loads_in_peft(gpt2_dir, tmp_path, case):
    config = LoRAConfig(alpha=6.0, **case)
    ours = our_lora_gpt2(gpt2_dir, config)
    export_peft_adapter(ours, config, tmp_path / "adapter", base_model_name_or_path=str(gpt2_dir))
    theirs = peft.PeftModel.from_pretrained(hf_gpt2(gpt2_dir), tmp_path / "adapter").eval()
    assert_close(logits_of(ours), logits_of(theirs), changed_from=logits_of(hf_gpt2(gpt2_dir)))


def test_exported_config_is_peft_format(gpt2_dir, tmp_path):
    config = LoRAConfig(rank=4, alpha=6.0, target_modules=["q_proj", "v_proj", "fc_out"], scaling="rslora")
    export_peft_adapter(our_lora_gpt2(gpt2_dir, config), config, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = peft.LoraConfig.from_pretrained(tmp_path)  # PEFT itself reads our config
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora) == (4, 6.0, True)
    assert sorted(loaded.target_modules) == ["attn.c_attn", "mlp.c_proj"] == written["target_modules"]
    assert loaded.rank_pattern == {"attn.c_attn": 8}  # q and v fused
    assert loaded.alpha_pattern == {"attn.c_attn": pytest.approx(6.0 * 2 ** 0.5)}
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in keys


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip_restores_our_adapter(gpt2_dir, tmp_path, case):
    config = LoRAConfig(alpha=6.0, **case)
    ours = our_lora_gpt2(gpt2_dir, config)
    export_peft_adapter(ours, config, tmp_path)
    fresh = load_gpt2(gpt2_dir)
    assert import_peft_adapter(fresh, tmp_path) == config
    expected = lora_state_dict(ours)
    assert lora_state_dict(fresh).keys() == expected.keys()
    for key, value in lora_state_dict(fresh).items():
        assert torch.equal(value, expected[key]), key
    assert_close(logits_of(fresh.eval()), logits_of(ours))


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_import_adapter_trained_with_peft(gpt2_dir, tmp_path, scaling):
    """A PEFT adapter made on Hugging Face's GPT-2, with a dense c_attn B and per-module ranks/alphas."""
    torch.manual_seed(4)
    theirs = peft.get_peft_model(hf_gpt2(gpt2_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "mlp.c_fc"], use_rslora=scaling == "rslora",
        rank_pattern={"mlp.c_fc": 2}, alpha_pattern={"c_attn": 5}, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    ours = load_gpt2(gpt2_dir)
    config = import_peft_adapter(ours, tmp_path)
    assert (config.rank, config.alpha, config.scaling) == (4, 8, scaling)
    assert config.target_modules == ["fc_in", "k_proj", "o_proj", "q_proj", "v_proj"]
    layers = lora_layers(ours)
    assert (layers["transformer.h.0.attn.k_proj"].rank, layers["transformer.h.0.attn.k_proj"].alpha) == (4, 5)
    assert (layers["transformer.h.1.mlp.fc_in"].rank, layers["transformer.h.1.mlp.fc_in"].alpha) == (2, 8)
    assert_close(logits_of(ours.eval()), logits_of(theirs.eval()), changed_from=logits_of(hf_gpt2(gpt2_dir)))


def test_exported_adapter_trained_on_as_one_c_attn(gpt2_dir, tmp_path):
    """Once the zero blocks of the fused B are non-zero, q/k/v rank-r LoRAs cannot hold it: the import
    falls back to full-rank q/k/v LoRAs and still computes what PEFT computes."""
    config = LoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    export_peft_adapter(our_lora_gpt2(gpt2_dir, config), config, tmp_path)
    path = tmp_path / PEFT_WEIGHTS
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(5))
    save_file(tensors, path, metadata=metadata)
    ours = load_gpt2(gpt2_dir)
    import_peft_adapter(ours, tmp_path)
    assert lora_layers(ours)["transformer.h.0.attn.k_proj"].rank == 4  # c_attn's fused rank, k included
    theirs = peft.PeftModel.from_pretrained(hf_gpt2(gpt2_dir), tmp_path).eval()
    assert_close(logits_of(ours.eval()), logits_of(theirs))


@pytest.mark.parametrize("gpt2_dir", [True, False], ids=["tied", "untied"], indirect=True)
def test_merged_checkpoint_loads_as_plain_gpt2(gpt2_dir, tmp_path):
    config = LoRAConfig(rank=4, alpha=8.0, target_modules=ALL)
    ours = our_lora_gpt2(gpt2_dir, config)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    save_merged_gpt2(ours, tmp_path)
    assert not any(layer.merged for layer in lora_layers(ours).values())
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # the caller's model is untouched
    merged = hf_gpt2(tmp_path)
    assert not hasattr(merged, "peft_config")
    assert_close(logits_of(merged), logits_of(ours), changed_from=logits_of(hf_gpt2(gpt2_dir)))


def test_a_qlora_model_exports_merged_only_with_dequantize_and_never_as_peft(gpt2_dir, tmp_path):
    config = LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], quantize="nf4")
    ours = our_lora_gpt2(gpt2_dir, config)
    with pytest.raises(ValueError, match="nf4-quantized .* export the merged model instead"):
        export_peft_adapter(ours, config, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"nf4-quantized .* save_merged_gpt2\(model, directory, dequantize=True\)"):
        save_merged_gpt2(ours, tmp_path)
    save_merged_gpt2(ours, tmp_path, dequantize=True)
    assert len(quantized_layers(ours)) == 6 * TINY["n_layer"]  # the caller's model stays quantized
    # the checkpoint computes what the QLoRA model computes, quantization error included
    assert_close(logits_of(hf_gpt2(tmp_path)), logits_of(ours), changed_from=logits_of(hf_gpt2(gpt2_dir)))


def test_unsupported_adapters_are_clear_errors(gpt2_dir, tmp_path):
    head = LoRAConfig(rank=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        export_peft_adapter(our_lora_gpt2(gpt2_dir, head), head, tmp_path / "head")
    ours = our_lora_gpt2(gpt2_dir, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="not merged"):
        gpt2_state_dict(ours)
    export_peft_adapter(ours, LoRAConfig(rank=2), tmp_path / "qv")
    with pytest.raises(ValueError, match="already has LoRA"):
        import_peft_adapter(ours, tmp_path / "qv")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        import_peft_adapter(load_gpt2(gpt2_dir), tmp_path)
    theirs = peft.get_peft_model(hf_gpt2(gpt2_dir), peft.LoraConfig(
        r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True))
    theirs.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):
        import_peft_adapter(load_gpt2(gpt2_dir), tmp_path / "dora")


@pytest.mark.parametrize("variant", [dict(dora=True), dict(init="pissa"), dict(init="pissa", dora=True),
                                     dict(init="pissa", scaling="rslora")],
                         ids=["dora", "pissa", "pissa+dora", "pissa-rslora"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "fc_out"]], ids=["qv", "k-fc_out"])
def test_dora_and_pissa_exports_load_in_peft_with_the_same_logits(gpt2_dir, tmp_path, variant, targets):
    """DoRA as PEFT's use_dora; PiSSA as PEFT converts it: a rank-2r LoRA on the original base."""
    config = LoRAConfig(alpha=6.0, rank=2, target_modules=targets, **variant)
    ours = our_lora_gpt2(gpt2_dir, config)
    with torch.no_grad():  # a magnitude away from ‖W‖, so DoRA's own parameter matters
        for layer in lora_layers(ours).values():
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(torch.linspace(0.8, 1.2, layer.out_features))
    export_peft_adapter(ours, config, tmp_path / "adapter", base_model_name_or_path=str(gpt2_dir))
    theirs = peft.PeftModel.from_pretrained(hf_gpt2(gpt2_dir), tmp_path / "adapter").eval()
    assert_close(logits_of(ours), logits_of(theirs), changed_from=logits_of(hf_gpt2(gpt2_dir)))
