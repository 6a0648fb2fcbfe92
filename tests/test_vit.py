"""LoRA beyond language: the ViT, the digits split, modules_to_save, and the vision run end to end."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from loralab.adapters import load_adapter, save_adapter
from loralab.lora import LoRAConfig, inject_lora
from loralab.vision_data import DigitsDataModule
from loralab.vit import ViT, ViTConfig

from conftest import read_summary, run_train

CONFIG = ViTConfig(image_size=8, patch_size=2, channels=1, n_layer=2, n_head=4, n_embd=32, n_classes=5)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))  # (B, C, H, W)


def test_parameter_count_by_formula():
    c = CONFIG
    E, P, N = c.n_embd, c.channels * c.patch_size ** 2, (c.image_size // c.patch_size) ** 2
    per_block = 4 * (E * E + E) + (E * 4 * E + 4 * E) + (4 * E * E + E) + 2 * 2 * E  # attention, MLP, 2 LayerNorms
    expected = (P * E + E) + E + (N + 1) * E + c.n_layer * per_block + 2 * E + (E * c.n_classes + c.n_classes)
    assert sum(p.numel() for p in ViT(c).parameters()) == expected


def test_throughput_counts_a_vit_batch_in_patches_not_pixels():
    from loralab.model import GPT, GPTConfig
    from loralab.model_kinds import kind_of
    vit = ViT(CONFIG)
    assert kind_of(vit).positions(vit, images(4)) == 4 * (16 + 1)  # (8 / 2)² patches and the class token; 256 pixels
    text = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    assert kind_of(text).positions(text, torch.zeros(4, 16, dtype=torch.long)) == 4 * 16


def test_attention_is_not_causal_the_class_token_sees_the_last_patch():
    torch.manual_seed(0)
    model = ViT(CONFIG).eval()
    x = images(1)
    changed = x.clone()
    changed[..., -1, -1] += 1.0  # a pixel of the last patch; the class token comes first
    assert not torch.allclose(model(x)[0], model(changed)[0])


def test_lora_on_the_projections_equals_the_base_at_init():
    torch.manual_seed(0)
    model = ViT(CONFIG).eval()
    x = images()
    before = model(x)[0]
    adapted = inject_lora(model, LoRAConfig(rank=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "fc_in", "fc_out", "patch_embed"]))
    assert len(adapted) == 6 * CONFIG.n_layer + 1
    assert torch.equal(model(x)[0], before)


def test_modules_to_save_trains_the_head_and_is_saved_with_the_adapter(tmp_path):
    torch.manual_seed(0)
    base_state = ViT(CONFIG).state_dict()
    model = ViT(CONFIG)
    model.load_state_dict(base_state)
    config = LoRAConfig(rank=2, modules_to_save=["head"])
    inject_lora(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} | {"head.weight", "head.bias"}
    x, y = images(8), torch.arange(8) % 5
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(x, y)[1].backward()
        optimizer.step()
    assert not torch.equal(model.head.weight, base_state["head.weight"])
    save_adapter(model, config, tmp_path / "adapter")

    fresh = ViT(CONFIG)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x)[0], model(x)[0])


def test_modules_to_save_that_names_no_module_fails_naming_it():
    with pytest.raises(ValueError, match="classifier"):
        inject_lora(ViT(CONFIG), LoRAConfig(rank=2, modules_to_save=["classifier"]))


def test_digits_split_classes_scaled_pixels_and_a_split_fixed_across_seeds():
    base, new = DigitsDataModule("digits_0_4", seed=1), DigitsDataModule("digits_5_9", seed=1)
    other_seed = DigitsDataModule("digits_5_9", seed=2)
    for data in (base, new):
        x, y = data.train_set.tensors
        assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
        assert set(y.tolist()) == {0, 1, 2, 3, 4}
    assert not torch.equal(base.train_set.tensors[0][:50], new.train_set.tensors[0][:50])
    assert len(new.val_set) + len(new.train_set) == 1797 - len(base.val_set) - len(base.train_set)
    assert torch.equal(new.val_set.tensors[0], other_seed.val_set.tensors[0])


VISION = ["model=vit_tiny", "data=digits", "base.steps=150", "trainer.max_steps=60", "trainer.val_check_interval=30",
          "trainer.enable_progress_bar=false", "logger=none"]


@pytest.mark.slow
def test_vision_run_end_to_end_learns_the_new_classes(tmp_path, base_cache):
    run_dir = tmp_path / "run"
    run_train([*VISION, f"paths.cache_dir={base_cache}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = read_summary(run_dir)
    m = summary["metrics"]
    assert summary["status"] == "completed"
    assert m["val/acc"] > 0.5  # five classes: chance is 0.2
    assert m["val/acc"] > m["base/val_acc"] and m["lora/merge_ok"]
    head = 32 * 5 + 5
    assert m["params/trainable"] == m["params/lora_analytic"] + head
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
