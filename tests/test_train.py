"""`python train.py` end to end: Hydra multiruns, Lightning training, W&B offline runs,
summary.json, failures, divergence, reproducibility and config errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from loralab.config import ConfigError, validate
from loralab.exits import EXIT_CONFIG, EXIT_DIVERGED

from conftest import TINY, compose, run_train
from conftest import read_summary as summary
from wandb_offline import offline_runs


def tiny_qv_lora_params(rank: int) -> int:
    """r·(in + out) for q_proj and v_proj (64 -> 64) in each of the tiny model's 2 layers."""
    n_layer, n_embd = 2, 64
    return n_layer * 2 * rank * (n_embd + n_embd)


@pytest.mark.slow
def test_rank_multirun_gives_one_wandb_run_per_job(tmp_path, base_cache):
    sweep = tmp_path / "sweep"
    run_train(["-m", "lora.rank=2,4,8", *TINY, f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"],
              cwd=tmp_path)
    for job, rank in enumerate((2, 4, 8)):
        run_dir = sweep / str(job)
        s = summary(run_dir)
        assert s["status"] == "completed" and s["error"] is None
        assert s["overrides"][0] == f"lora.rank={rank}"
        assert s["name"] == f"lora.rank={rank}"  # named by what the sweep varies
        m = s["metrics"]
        assert m["params/trainable"] == tiny_qv_lora_params(rank) == m["params/lora_analytic"]
        assert m["lora/merge_ok"] and m["lora/merge_max_abs_diff"] <= 1e-4
        assert (run_dir / "adapter" / "adapter.safetensors").is_file()
        assert (run_dir / ".hydra" / "config.yaml").is_file()

        finetune = [r for r in offline_runs(run_dir) if r.job_type == "finetune"]
        assert len(finetune) == 1, "each job must be its own W&B run"
        run = finetune[0]
        assert run.config["lora.rank"] == rank and run.name == s["name"]
        assert run.group == f"sweep {tmp_path.name}/sweep"  # readable: no path of this machine
        assert run.exit_code == 0
        losses = run.metric("train/loss")
        assert len(losses) == 12 and losses == [v for _, v in s["history"]["train/loss"]]
        assert run.summary["params/trainable"] == tiny_qv_lora_params(rank)
        assert run.summary["lora/merge_max_abs_diff"] <= 1e-4
    ids = {r.run_id for job in ("0", "1", "2", "report") for r in offline_runs(sweep / job)}  # and the report's run
    assert len(ids) == len(list(sweep.rglob("run-*.wandb")))  # no run was logged into twice


@pytest.mark.slow
def test_failing_job_does_not_stop_the_others(tmp_path, base_cache):
    """A base checkpoint whose header is intact but whose last weights were zeroed passes the
    checks before the sweep (they read the header only) and fails in its job, as a file
    damaged on disk does."""
    import torch

    from loralab.base import save_base
    from loralab.config import model_config_of
    from loralab.model import GPT

    torch.manual_seed(0)
    good, damaged = tmp_path / "good.safetensors", tmp_path / "damaged.safetensors"
    save_base(GPT(model_config_of(compose(TINY).model)), good)
    damaged.write_bytes(good.read_bytes()[:-1000] + bytes(1000))
    sweep = tmp_path / "sweep"
    result = run_train(["-m", f"base.checkpoint={damaged},{good}", *TINY, "logger=none", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, check=False)
    assert result.returncode == 1  # the sweep as a whole failed ...
    failed, completed = summary(sweep / "0"), summary(sweep / "1")
    assert failed["status"] == "failed" and str(damaged) in failed["error"]
    assert not (sweep / "0" / "adapter").exists()  # nothing that looks like a result
    assert completed["status"] == "completed"  # ... but the next job still ran


def train_in_process(tmp_path: Path, base_cache: Path, overrides: list[str], logger: str = "none") -> dict:
    from loralab.run import train

    cfg = compose([*TINY, f"logger={logger}", f"paths.cache_dir={base_cache}", f"paths.output_dir={tmp_path}",
                   *overrides])
    train(cfg)
    return summary(tmp_path)


def test_val_loss_is_weighted_by_tokens_and_a_nan_batch_is_never_dropped():
    from loralab.model import GPT, GPTConfig
    from loralab.module import LitTransformer
    module = LitTransformer(GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)), lr=1e-3)
    module.val_loss.update(torch.tensor(1.0), weight=1)  # a batch of 1 token
    module.val_loss.update(torch.tensor(4.0), weight=3)  # a batch of 3 tokens
    assert module.val_loss.compute() == pytest.approx((1.0 + 4.0 * 3) / 4)
    module.val_loss.update(torch.tensor(float("nan")), weight=10)  # one batch overflowed
    assert not torch.isfinite(module.val_loss.compute())  # torchmetrics' default would drop it and say 3.25


@pytest.mark.slow
def test_diverging_run_is_marked_diverged(tmp_path, base_cache):
    s = train_in_process(tmp_path, base_cache, ["optim.lr=1e30", "trainer.gradient_clip_val=null"])
    assert s["status"] == "diverged"
    assert s["steps"] < 12  # it stopped early
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_same_seed_gives_the_identical_loss_curve(tmp_path, base_cache):
    first = train_in_process(tmp_path / "a", base_cache, ["seed=7"])
    second = train_in_process(tmp_path / "b", base_cache, ["seed=7"])
    other = train_in_process(tmp_path / "c", base_cache, ["seed=8"])
    assert first["history"]["train/loss"] == second["history"]["train/loss"]
    assert first["metrics"]["val/loss"] == second["metrics"]["val/loss"]
    assert first["history"]["train/loss"] != other["history"]["train/loss"]


@pytest.mark.slow
def test_full_finetuning_trains_every_weight_and_the_adapter_alone_reproduces_the_lora_run(tmp_path, base_cache):
    from loralab.base import load_base

    full = train_in_process(tmp_path / "full", base_cache, ["lora=full"])
    assert full["status"] == "completed"
    assert full["metrics"]["params/trainable"] == full["metrics"]["params/total"]
    assert full["metrics"]["params/trainable_pct"] == 100
    assert not (tmp_path / "full" / "adapter").exists()

    lora = train_in_process(tmp_path / "lora", base_cache, [])
    base, _ = load_base(tiny_base_file(base_cache))
    # The adapter on the cached base reproduces the run's final val/loss: training
    # changed nothing but the adapter.
    from loralab.adapters import load_adapter
    from loralab.data import TextDataModule
    from loralab.lora import lora_layers

    load_adapter(base, tmp_path / "lora" / "adapter")
    assert lora_layers(base)
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}"])
    data = TextDataModule(block_size=base.config.block_size, **cfg.data)
    batches = list(data.val_dataloader())  # the final numbers cover the whole held-out split
    assert lora["metrics"]["val/tokens"] == sum(y.numel() for _, y in batches)
    with torch.no_grad():
        losses = [base.eval()(x, y)[1] * y.numel() for x, y in batches]
    val_loss = (sum(losses) / sum(y.numel() for _, y in batches)).item()
    assert val_loss == pytest.approx(lora["metrics"]["val/loss"], abs=1e-5)
    assert lora["metrics"]["gain/val_loss"] == pytest.approx(
        lora["metrics"]["base/val_loss"] - lora["metrics"]["val/loss"])
    # test/loss: the whole test split; forget/loss: the whole held-out part of the base's own
    # corpus (python_stdlib); base/*: the base alone, before fine-tuning
    untouched, _ = load_base(tiny_base_file(base_cache))
    source = TextDataModule(block_size=base.config.block_size, corpus=cfg.base.corpus, max_bytes=cfg.base.max_bytes,
                            val_fraction=cfg.base.val_fraction, batch_size=cfg.base.batch_size)
    expected = {"test/loss": mean_loss(base, data.test_dataloader()),
                "base/test_loss": mean_loss(untouched, data.test_dataloader()),
                "forget/loss": mean_loss(base, source.val_dataloader()),
                "base/forget_loss": mean_loss(untouched, source.val_dataloader())}
    for name, value in expected.items():
        assert lora["metrics"][name] == pytest.approx(value, abs=1e-5), name
    assert lora["metrics"]["forget/increase"] == pytest.approx(expected["forget/loss"] - expected["base/forget_loss"],
                                                               abs=1e-5)
    assert lora["metrics"]["forget/tokens"] == len(source.val_set) * base.config.block_size
    assert full["metrics"]["forget/increase"] != lora["metrics"]["forget/increase"]


def mean_loss(model: torch.nn.Module, loader) -> float:
    """Token-weighted mean loss over a whole split, computed directly."""
    with torch.no_grad():
        total = sum(model.eval()(x, y)[1].double() * y.numel() for x, y in loader)
    return (total / sum(y.numel() for _, y in loader)).item()


def tiny_base_file(base_cache: Path) -> Path:
    """The cached base of the TINY config (the cache also holds other tests' bases)."""
    from loralab.base import load_base
    from loralab.config import model_config_of

    tiny = model_config_of(compose(TINY).model)
    [path] = [p for p in base_cache.glob("base-*.safetensors") if load_base(p)[0].config == tiny]
    return path


@pytest.mark.slow
def test_own_text_files_with_the_csv_logger(tmp_path, base_cache):
    import string
    import textwrap

    s = train_in_process(tmp_path, base_cache, ["data=text", f"data.train_path={textwrap.__file__}",
                                                f"data.val_path={string.__file__}"], logger="csv")
    assert s["status"] == "completed"
    rows = list(csv.DictReader((tmp_path / "csv" / "finetune" / "metrics.csv").open()))
    logged = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert logged == pytest.approx([v for _, v in s["history"]["train/loss"]])
    # validation is on the first half of string.py (the second is the test split, data.test_fraction
    # = data.val_fraction): the base's val/loss there is what the base computes on its bytes
    from loralab.base import load_base
    from loralab.data import TextDataModule

    data = TextDataModule(corpus="text", train_path=textwrap.__file__, val_path=string.__file__, block_size=64,
                          batch_size=8, val_fraction=0.1, test_fraction=0.1)
    assert len(data.val_set.ids) == round(len(open(string.__file__, "rb").read()) / 2)
    base = load_base(tiny_base_file(base_cache))[0].eval()
    batches = list(data.val_dataloader())
    with torch.no_grad():
        total = sum(base(x, y)[1] * y.numel() for x, y in batches) / sum(y.numel() for _, y in batches)
    assert s["metrics"]["base/val_loss"] == pytest.approx(total.item(), abs=1e-5)


@pytest.mark.slow
def test_tensorboard_logger_and_a_given_base_checkpoint(tmp_path, base_cache):
    pytest.importorskip("tensorboard")
    cached = train_in_process(tmp_path / "cached", base_cache, [])
    s = train_in_process(tmp_path / "given", base_cache, [f"base.checkpoint={tiny_base_file(base_cache)}"],
                         logger="tensorboard")
    assert s["status"] == "completed"
    assert list((tmp_path / "given" / "tensorboard" / "finetune").glob("events.out.tfevents.*"))
    assert s["metrics"]["base/val_loss"] == cached["metrics"]["base/val_loss"]


@pytest.mark.parametrize("override,message", [
    ("lora.rank=0", "LoRA rank=0 is invalid: expected a positive integer"),
    ("lora.rank=1000", "rank=1000 is larger than min(in, out)=64 of layer 'transformer.h.0.attn.q_proj'"),
    ("lora.alpha=-1", "LoRA alpha=-1.0 is invalid: expected a finite number > 0"),
    ("lora.alpha=inf", "LoRA alpha=inf is invalid: expected a finite number > 0"),
    ("lora.dropout=1.5", "LoRA dropout=1.5 is invalid"),
    ("lora.scaling=sqrt", "LoRA scaling='sqrt' is invalid: expected one of ['standard', 'rslora']"),
    ("lora.target_modules=[query]", "matched no nn.Linear"),
    ("optim.lr=-1", "optim.lr=-1.0 is invalid: expected a finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf is invalid: expected a finite number > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is invalid: expected a finite number >= 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0 is invalid: expected a number in [0, 1]"),
    ("+lora.rnak=4", "unknown config key 'lora.rnak': lora has no such key"),
    ("+trainer.logger=true", "trainer.logger is not allowed: set by loralab itself"),
    ("+trainer.max_stpes=3", "trainer.max_stpes is not allowed: a pytorch_lightning.Trainer argument"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is invalid: expected a positive integer"),
    ("logger.mode=sometimes", "logger.mode='sometimes' is invalid"),
    ("data.corpus=wiki", "data.corpus='wiki' is invalid: expected one of"),
    ("data=text", "data.train_path is required with data.corpus=text"),
    ("data=text data.train_path=/no/such/file.txt", "data.train_path='/no/such/file.txt' is invalid"),
    ("model.n_embd=33", "n_embd=33 is not divisible by n_head=2"),
    ("model=gpt2", "model=gpt2 needs model.pretrained: a local Hugging Face GPT-2 directory"),  # not hours pretraining
])
def test_bad_config_values_are_named(tmp_path, override, message):
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}", *override.split()])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert message in str(error.value)


@pytest.mark.parametrize("override,message", [
    ("lora.rnak=4", "Key 'rnak' not in 'LoRASection'"),
    ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("optim.weight_decay=abc", "Value 'abc' of type 'str' could not be converted to Float"),
])
def test_unknown_keys_and_wrong_types_fail_while_composing(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        compose([*TINY, override])
    assert message in str(error.value.__cause__ or error.value)


def test_all_problems_are_reported_at_once(tmp_path):
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}", "lora.rank=0", "optim.lr=-1", "data.batch_size=0"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("lora: LoRA rank=0") and "optim.lr=-1" in lines[2] and "data.batch_size=0" in lines[1]


@pytest.mark.slow
def test_bad_config_is_one_line_not_a_traceback(tmp_path):
    result = run_train(["lora.rank=-3", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert result.returncode == EXIT_CONFIG
    assert "LoRA rank=-3 is invalid: expected a positive integer" in result.stderr
    assert "Traceback" not in result.stderr
    s = summary(tmp_path / "run")
    assert s["status"] == "failed" and "rank=-3" in s["error"]


@pytest.mark.slow
def test_diverging_learning_rates_end_as_diverged_not_as_a_crash(tmp_path, base_cache):
    """An lr sweep that blows up: the adapters hold NaN or inf after training, and nothing after
    training (adapter analysis, merge check, summary) may crash on them."""
    sweep = tmp_path / "sweep"
    result = run_train(["-m", "optim.lr=1e4,1e8", *TINY, "trainer.max_steps=6", "logger=none",
                        f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert [summary(sweep / job)["status"] for job in ("0", "1")] == ["diverged", "diverged"]


@pytest.mark.parametrize("override, section, key_value", [
    ("data.batch_size=100000", "data", "data.batch_size=100000"),
    ("data.max_bytes=2000", "data", "data.batch_size=16"),
    ("base.batch_size=100000", "base", "base.batch_size=100000"),
])
def test_a_train_split_smaller_than_one_batch_is_refused_before_any_work(tmp_path, override, section, key_value):
    from loralab.data import TextDataModule

    cfg = compose([override, f"paths.output_dir={tmp_path}"])
    node = cfg[section]
    windows = len(TextDataModule(corpus=node.corpus, block_size=cfg.model.block_size, max_bytes=node.max_bytes,
                                 val_fraction=node.val_fraction, test_fraction=node.get("test_fraction") or 0.0,
                                 batch_size=node.batch_size).train_set)  # what training would draw batches from
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert f"{key_value} is invalid: expected at most the {windows} windows" in str(error.value)
