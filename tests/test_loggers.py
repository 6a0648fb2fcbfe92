"""Run naming (overrides.py, loggers.py) and W&B mode selection (wandb_setup.py)."""

import pytest
from omegaconf import OmegaConf

from loralab.layout import declared_sweep
from loralab.loggers import flatten
from loralab.overrides import sweep_label
from loralab.wandb_setup import wandb_mode


def test_flatten_gives_dotted_keys_wandb_can_group_by():
    nested = {"lora": {"rank": 4, "target_modules": ["q_proj"]}, "seed": 1, "model": {"n_embd": 64}}
    assert flatten(nested) == {"lora.rank": 4, "lora.target_modules": ["q_proj"], "seed": 1, "model.n_embd": 64}


@pytest.mark.parametrize("env,netrc,mode,expected", [
    ({}, None, "auto", "offline"),                                    # nothing set up: never a login prompt
    ({"WANDB_API_KEY": "k"}, None, "auto", "online"),                 # set up with a key
    ({}, "machine api.wandb.ai\n  login user\n  password k\n", "auto", "online"),  # `wandb login` done
    ({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}, None, "auto", "disabled"),  # WANDB_MODE wins
    ({"WANDB_MODE": "offline"}, None, "online", "offline"),
    ({}, None, "online", "online"),
])
def test_wandb_mode(monkeypatch, tmp_path, env, netrc, mode, expected):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    if netrc:
        (tmp_path / ".netrc").write_text(netrc)
        (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode(mode) == expected


def write_multirun_yaml(sweep_dir, task: list[str], params: dict[str, str]) -> None:
    """What Hydra's sweepers write into a sweep directory before any job starts."""
    (sweep_dir / "multirun.yaml").write_text(OmegaConf.to_yaml(
        {"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}}))


def test_no_multirun_yaml_is_no_declared_sweep(tmp_path):
    assert declared_sweep(tmp_path) is None


@pytest.mark.parametrize("task,params,job_overrides,label", [
    # command-line sweeps: a key, a group, and both
    (["lora.rank=4,8", "model=tiny"], {}, ["lora.rank=4", "model=tiny"], "lora.rank=4"),
    (["lora/targets=q,qv"], {}, ["lora/targets=qv"], "lora/targets=qv"),
    (["lora.rank=4,8", "lora/targets=q,qv"], {}, ["lora.rank=8", "lora/targets=q"], "lora.rank=8,lora/targets=q"),
    # sweeps an experiment file declares, with + and ++ prefixes (the job's override keeps its prefix)
    (["experiment=target_modules", "logger=none"], {"+lora/budget": "q,v,qv"},
     ["+lora/budget=q", "experiment=target_modules", "logger=none"], "+lora/budget=q"),
    (["experiment=x"], {"++lora.alpha": "8,16"}, ["++lora.alpha=16", "experiment=x"], "++lora.alpha=16"),
    (["experiment=x", "seed=1,2"], {"lora.rank": "4,8"}, ["lora.rank=4", "experiment=x", "seed=2"],
     "seed=2,lora.rank=4"),
])
def test_a_run_is_named_by_what_its_sweep_varies(tmp_path, task, params, job_overrides, label):
    write_multirun_yaml(tmp_path, task, params)
    swept, _ = declared_sweep(tmp_path)
    assert sweep_label(job_overrides, swept) == label


@pytest.mark.parametrize("failed,exit_code", [(True, 1), (False, 0)])
def test_a_failed_job_marks_its_wandb_run_failed(tmp_path, failed, exit_code):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from loralab.loggers import finish_logger

    from wandb_offline import offline_runs

    logger = WandbLogger(project="loralab", name="job", save_dir=str(tmp_path), mode="offline")
    logger.experiment.log({"train/loss": 1.0})
    finish_logger(logger, failed=failed)
    wandb.teardown()  # the W&B service writes the run file in the background: wait until it has
    [run] = offline_runs(tmp_path)
    assert run.name == "job" and run.exit_code == exit_code


def test_setting_id_is_shared_by_seeds_and_differs_between_settings(tmp_path):
    from loralab.loggers import setting_id

    from conftest import TINY, compose

    def sid(*overrides):
        return setting_id(compose([*TINY, f"paths.output_dir={tmp_path}", *overrides]))

    seed1 = sid("seed=1")
    assert seed1 == sid("seed=2") == sid("seed=3", "logger=none", f"paths.cache_dir={tmp_path}")
    assert len({seed1, sid("seed=1", "lora.rank=4"), sid("seed=1", "lora=full"), sid("optim.lr=0.02")}) == 4


@pytest.mark.parametrize("experiment,group", [("rank_sweep", "rank_sweep 2026-11-23/10-59-01"),
                                              (None, "sweep 2026-11-23/10-59-01")])
def test_a_sweeps_wandb_group_is_its_experiment_and_time_not_a_path(experiment, group):
    from loralab.loggers import sweep_group

    hydra = OmegaConf.create({"sweep": {"dir": "/home/me/loralab/outputs/multirun/2026-11-23/10-59-01"},
                              "runtime": {"choices": {"experiment": experiment}}})
    assert sweep_group(hydra) == group


@pytest.mark.slow
def test_online_with_an_unreachable_server_logs_offline_after_a_bounded_wait(monkeypatch, tmp_path, caplog):
    """W&B's own wait is 90 s, then a traceback; here the run goes on offline and says so."""
    import time

    from loralab.wandb_setup import ONLINE_WAIT_S, start_wandb

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.monotonic()
    run = start_wandb("auto", project="p", dir=str(tmp_path), id="unreachable1", resume="allow", config={"x": 1})
    waited = time.monotonic() - started
    run.log({"train/loss": 1.0})
    run.finish()
    assert run.settings.mode == "offline"
    assert waited < ONLINE_WAIT_S + 30  # the bounded wait, and a restart of W&B's service
    [warning] = [r.getMessage() for r in caplog.records if r.name == "loralab.wandb_setup"]
    assert "logging offline instead" in warning and f"wandb sync {tmp_path}/wandb/offline-run-*" in warning
    assert list((tmp_path / "wandb").glob("offline-run-*-unreachable1"))
