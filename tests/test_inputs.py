"""Inputs checked before any work, errors as their lines alone, exit codes, a report that
survives its inputs, a quiet console, and provenance (issue 10)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from loralab.config import ConfigError, validate
from loralab.exits import (
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    config_error_lines,
    sweep_exit_code,
)

from conftest import ROOT, TINY, compose, user_env
from conftest import read_summary as summary
from wandb_offline import offline_runs

TINY_BLOCK = 64  # conf/model/tiny.yaml's block_size: one block is 65 tokens


@pytest.fixture
def files(tmp_path) -> Path:
    """Bad inputs on disk: short, empty and binary data files, a checkpoint that is not one,
    GPT-2 directories without config.json and without weights."""
    (tmp_path / "short.txt").write_text("x" * TINY_BLOCK)  # 64 bytes: the train split is short of a block
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "long.txt").write_text("a line of text\n" * 200)
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 20)  # NUL bytes
    (tmp_path / "latin1.txt").write_bytes("é à ü ".encode("latin-1") * 200)  # 3 of 7 bytes not UTF-8
    (tmp_path / "fake.safetensors").write_text("not a safetensors file")
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps({"n_layer": 2, "n_embd": 64, "n_head": 2}))
    return tmp_path


BAD_INPUTS = [  # (overrides, the one line's beginning, what it must also say)
    ("data=text data.train_path=empty.txt", "data.train_path='empty.txt' is invalid",
     "at least one block of the model (65 tokens) in each split; it holds 0 in the train split, 0 in the validation"),
    ("data=text data.train_path=short.txt", "data.train_path='short.txt' is invalid",
     "(65 tokens) in each split; it holds 51 in the train split, 6 in the validation split, 7 in the test split "
     "(val_fraction=0.1, test_fraction=0.1)"),  # 64 bytes: 80 % train, the held-out 13 cut in half
    ("data=text data.train_path=long.txt data.val_path=short.txt", "data.val_path='short.txt' is invalid",
     "it holds 32 in the validation split, 32 in the test split"),  # no test_path: the val file cut in half
    ("data=text data.train_path=long.txt data.test_path=short.txt", "data.test_path='short.txt' is invalid",
     "it holds 64 in the test split"),
    ("data=text data.train_path=long.txt data.test_path=missing.txt", "data.test_path='missing.txt' is invalid",
     "an existing text file"),
    ("data.test_fraction=0.9", "data.test_fraction=0.9 is invalid", "a number in (0, 1 - val_fraction=0.1)"),
    ("data=text data.train_path=binary.bin", "data.train_path='binary.bin' is invalid",
     "UTF-8 text file; binary.bin holds NUL bytes: a binary file, not text"),
    ("data=text data.train_path=latin1.txt", "data.train_path='latin1.txt' is invalid",
     "50% of its bytes do not decode"),
    ("base.max_bytes=100", "base.max_bytes=100 is invalid",
     "(65 tokens) in each split; it holds 5 in the validation split (val_fraction=0.05)"),
    ("data.max_bytes=100", "data.max_bytes=100 is invalid", "it holds 10 in the validation split, 10 in the test"),
    ("base.checkpoint=fake.safetensors", "base.checkpoint='fake.safetensors' is invalid",
     "written by loralab, or null to pretrain; fake.safetensors is not a readable safetensors file"),
    ("base.checkpoint=missing.safetensors", "base.checkpoint='missing.safetensors' is invalid", "no such file"),
    ("model.pretrained=no_config", "model.pretrained='no_config' is invalid", "it has no config.json"),
    ("model.pretrained=no_weights", "model.pretrained='no_weights' is invalid",
     "it holds none of ['model.safetensors'"),
    ("trainer.precision=16-mixed", "trainer.precision='16-mixed' is invalid",
     "AMP with float16 does not exist on the CPU: Lightning would run bf16-mixed instead"),
    ("trainer.precision=12", "trainer.precision: Precision 12 is invalid. Allowed precision values:", "'bf16-mixed'"),
    ("seed=-1", "seed=-1 is invalid", "an integer in [0, 4294967295]"),
    ("base.seed=4294967296", "base.seed=4294967296 is invalid", "an integer in [0, 4294967295]"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan is invalid", "a finite number >= 0"),
    ("base.lr=inf", "base.lr=inf is invalid", "a finite number > 0"),
    ("merge_tolerance=-inf", "merge_tolerance=-inf is invalid", "a finite number > 0"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val=inf is invalid", "a finite number >= 0"),
    ("+trainer.max_time=nan", "trainer.max_time=nan is invalid", "a finite number"),
    ("trainer.val_check_interval=0.5", "trainer.val_check_interval=0.5 is invalid", "a positive integer"),
    ("trainer.limit_val_batches=0", "trainer.limit_val_batches=0 is invalid", "a fraction in (0, 1]"),
]


@pytest.mark.parametrize("overrides,line,detail", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_each_bad_input_is_one_line_naming_key_value_and_what_is_allowed(files, monkeypatch, overrides, line,
                                                                         detail):
    monkeypatch.chdir(files)
    cache = files / "cache"
    cfg = compose([*TINY, f"paths.output_dir={files / 'run'}", f"paths.cache_dir={cache}", *overrides.split()])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    [only] = str(error.value).splitlines()
    assert only.startswith(line) and detail in only, only
    assert not cache.exists() and not (files / "run").exists()  # nothing was built or written


def test_an_accelerator_this_machine_lacks_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = compose([*TINY, "paths.output_dir=unused", "trainer.accelerator=gpu"])
    with pytest.raises(ConfigError, match=r"^trainer.accelerator='gpu' is invalid: expected an accelerator this "
                                          r"machine has: one of \['auto', 'cpu'\]$"):
        validate(cfg)


def test_what_the_hardware_runs_as_configured_passes(files):
    for overrides in (["trainer.precision=bf16-mixed"], ["trainer.precision=32"], ["trainer=auto"],
                      ["data=text", f"data.train_path={files / 'long.txt'}", f"data.val_path={files / 'long.txt'}"]):
        validate(compose([*TINY, "paths.output_dir=unused", *overrides]))


@pytest.mark.parametrize("override,line", [
    ("seed=abc", "seed='abc' is invalid: Value 'abc' of type 'str' could not be converted to Integer"),
    ("optim.weight_decay=abc", "optim.weight_decay='abc' is invalid: Value 'abc' of type 'str' could not be "
                               "converted to Float"),
    ("lora.rnak=4", "unknown config key 'lora.rnak': lora has no such key (see `python train.py --cfg job`)"),
    ("model=huge", "model='huge' is invalid: expected one of ['gpt2', 'medium', 'small', 'tiny', 'vit_tiny']"),
])
def test_hydra_composition_errors_become_one_line_naming_the_key(override, line):
    from hydra.errors import CompactHydraException

    with pytest.raises(CompactHydraException) as error:
        compose([*TINY, override])
    assert config_error_lines(error.value) == [line]


def test_a_sweep_exits_with_its_worst_outcome():
    assert sweep_exit_code(["completed", "completed"]) == 0
    assert sweep_exit_code(["completed", "diverged"]) == EXIT_DIVERGED
    assert sweep_exit_code(["diverged", "failed", "completed"]) == EXIT_FAILED
    assert sweep_exit_code(["diverged", "interrupted"]) == EXIT_INTERRUPTED == 4  # resumable, not a result
    assert sweep_exit_code(["interrupted", "failed"]) == EXIT_FAILED
    assert sweep_exit_code(["completed", None]) == EXIT_FAILED  # a summary that cannot be read


# --- python train.py, as a user runs it ----------------------------------------------


def train_py(args: list[str], cwd: Path, quiet_wandb: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    env = user_env()
    env.pop("HYDRA_FULL_ERROR", None)
    if not quiet_wandb:
        env.pop("WANDB_SILENT")
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    return result, time.time() - started


@pytest.mark.slow
@pytest.mark.parametrize("overrides,line", [
    ("seed=abc", "seed='abc' is invalid: Value 'abc' of type 'str' could not be converted to Integer"),
    ("base.max_bytes=100", "base.max_bytes=100 is invalid: expected text for at least one block of the model "
                           "(65 tokens) in each split; it holds 5 in the validation split (val_fraction=0.05)"),
    ("data=text data.train_path=binary.bin", "data.train_path='binary.bin' is invalid: expected a readable UTF-8 "
                                             "text file; binary.bin holds NUL bytes: a binary file, not text"),
])
def test_a_bad_input_prints_its_line_alone_and_does_no_work(files, overrides, line):
    result, wall_s = train_py([*TINY, *overrides.split(), f"hydra.run.dir={files / 'run'}"], cwd=files)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == line + "\n" and result.stdout == ""
    assert not (files / "outputs" / "cache").exists()  # the default cache: nothing pretrained
    assert wall_s < 90  # imports only (slower on a loaded machine); pretraining the default base takes minutes


@pytest.mark.slow
def test_diverged_exits_3_and_a_sweep_with_a_diverged_job_too(tmp_path, base_cache):
    diverging = ["trainer.gradient_clip_val=null", "logger=none", f"paths.cache_dir={base_cache}"]
    single, _ = train_py([*TINY, *diverging, "optim.lr=1e30", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert single.returncode == EXIT_DIVERGED and summary(tmp_path / "run")["status"] == "diverged"

    sweep_dir = tmp_path / "sweep"
    sweep, _ = train_py(["-m", *TINY, *diverging, "optim.lr=1e30,0.01", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert sweep.returncode == EXIT_DIVERGED
    assert [summary(sweep_dir / job)["status"] for job in ("0", "1")] == ["diverged", "completed"]
    assert f"[loralab] sweep {sweep_dir}: 1 diverged, 1 completed (exit 3)" in sweep.stdout


# --- the report survives its inputs ----------------------------------------------------


def fake_job(sweep_dir: Path, job: str, overrides: list[str], summary_text: str | None) -> None:
    (sweep_dir / job / ".hydra").mkdir(parents=True)
    (sweep_dir / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary_text is not None:
        (sweep_dir / job / "summary.json").write_text(summary_text)


def completed_summary(overrides: list[str], val_loss: float) -> str:
    return json.dumps({"status": "completed", "error": None, "overrides": overrides, "wall_time_s": 1.0,
                       "metrics": {"val/loss": val_loss, "best/val_loss": val_loss, "gain/val_loss": 0.1,
                                   "params/trainable": 10},
                       "history": {"train/loss": [[1, 3.0], [2, 2.0]], "val/loss": [[0, 3.0], [2, val_loss]]},
                       "config": {"seed": 1, "lora": {"enabled": True, "rank": 2}}})


def test_report_shows_unreadable_summaries_and_jobs_that_never_started(tmp_path):
    import csv

    from loralab.report import write_report

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    # the sweep `-m lora=default,full lora.rank=2,4`: full fine-tuning runs once, so 3 jobs
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["lora=default,full", "lora.rank=2,4"]}, "sweeper": {"params": None}}}))
    fake_job(sweep_dir, "0", ["lora=default", "lora.rank=2"], completed_summary(["lora=default", "lora.rank=2"], 2.5))
    fake_job(sweep_dir, "1", ["lora=default", "lora.rank=4"], '{"status": "compl')  # cut off mid-write
    write_report(sweep_dir)
    rows = list(csv.DictReader((sweep_dir / "report.csv").open()))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "lora=default,lora.rank=2", "completed"), ("1", "lora=default,lora.rank=4", "unreadable"),
        ("2", "lora=full,lora.rank=2", "not started")]
    assert rows[0]["val/loss"] == "2.5"
    assert rows[1]["error"].startswith(f"unreadable: {sweep_dir / '1' / 'summary.json'}: JSONDecodeError")
    assert "never started" in rows[2]["error"]


@pytest.mark.parametrize("garbage", ["[1, 2]", '{"no": "status"}', '{"status": "completed", "metrics": 3}',
                                     '{"status": "completed", "history": {"val/loss": [[0]]}}', "\x00\x01"])
def test_any_garbage_summary_is_its_row_and_the_rest_of_the_report_is_built(tmp_path, garbage):
    import csv

    from loralab.report import write_report

    fake_job(tmp_path, "0", ["lora.rank=2"], completed_summary(["lora.rank=2"], 2.5))
    fake_job(tmp_path, "1", ["lora.rank=4"], garbage)
    write_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["overrides"], r["status"]) for r in rows] == [("lora.rank=2", "completed"),
                                                             ("lora.rank=4", "unreadable")]
    assert rows[1]["error"].startswith("unreadable: ")
    assert (tmp_path / "loss_curves.png").is_file()  # the plots of the readable run were drawn


# --- console and provenance of a default run --------------------------------------------

NOISE = ("LeafSpec", "litlogger", "anonymous setting has no effect", "Seed set to", "GPU available: False",
         "TPU available", "`Trainer.fit` stopped", "Run history", "Warning", "warn(")


@pytest.mark.slow
def test_a_default_run_prints_no_noise_and_records_its_provenance(tmp_path, base_cache):
    run_dir = tmp_path / "run"
    result, _ = train_py([*TINY, f"paths.cache_dir={base_cache}", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                         quiet_wandb=False)  # W&B as a user sees it: the default logger, not silenced
    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    assert [noise for noise in NOISE if noise in console] == [], console
    assert "[loralab] " in result.stdout and ": completed |" in result.stdout  # it still says what matters

    recorded = summary(run_dir)["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert recorded["git_commit"] == head.strip() and isinstance(recorded["git_dirty"], bool)
    import pytorch_lightning
    import wandb

    assert recorded["versions"]["torch"] == torch.__version__
    assert recorded["versions"]["pytorch-lightning"] == pytorch_lightning.__version__
    assert recorded["versions"]["wandb"] == wandb.__version__
    assert recorded["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert recorded["device"] == "cpu" and recorded["machine"]["hostname"]
    [finetune] = [r for r in offline_runs(run_dir) if r.job_type == "finetune"]
    assert finetune.config["provenance.git_commit"] == recorded["git_commit"]
    assert finetune.config["provenance.versions.torch"] == torch.__version__


def test_git_state_is_none_outside_a_checkout_and_sees_uncommitted_changes(tmp_path):
    from loralab.provenance import git_state

    assert git_state(tmp_path) == (None, None)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "__init__.py").write_text("")
    subprocess.run([*git, "add", "__init__.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "__init__.py").write_text("x = 1\n")
    assert git_state(tmp_path) == (head, True)


def finished_lora_job(job_dir: Path, kind: str, modules_to_save: list[str]) -> None:
    """What a completed LoRA run leaves for loralab.evaluate: its summary, config and adapter config."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "model": {"kind": kind}}))
    (job_dir / "summary.json").write_text(json.dumps({"status": "completed", "name": "lora.rank=1"}))
    (job_dir / "adapter").mkdir()
    (job_dir / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"lora": {"rank": 1, "modules_to_save": modules_to_save}, "base": {"source": "cache", "sha256": "0" * 64}}))


@pytest.mark.parametrize("kind, modules_to_save, message", [
    ("vit", ["head"], "the sweep's runs are model.kind=vit: loralab.evaluate compares GPT adapters only"),
    ("gpt", ["lm_head"], "run 'lora.rank=1' trained modules_to_save=['lm_head'] in full beside its adapter"),
])
def test_evaluate_refuses_adapters_it_cannot_put_side_by_side_before_loading_any(tmp_path, kind, modules_to_save,
                                                                                 message):
    finished_lora_job(tmp_path / "0", kind, modules_to_save)
    result = subprocess.run([sys.executable, "-m", "loralab.evaluate", str(tmp_path)], capture_output=True,
                            text=True, env=user_env())
    assert result.returncode == 1 and result.stderr.startswith(f"error: {message}")
    assert "Traceback" not in result.stderr and not (tmp_path / "evaluation.md").exists()
