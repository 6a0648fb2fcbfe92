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
    from loralab.wandb_sweep import sweep_group

    hydra = OmegaConf.create({"sweep": {"dir": "/home/me/loralab/outputs/multirun/2026-11-23/10-59-01"},
                              "runtime": {"choices": {"experiment": experiment}}})
    assert sweep_group(hydra) == group


@pytest.mark.parametrize("overrides,absent,present", [
    (["lora=full"], "lora.", "model.vocab_size"),  # the baseline carries no LoRA settings
    (["model=vit_tiny", "data=digits"], "model.vocab_size", "model.patch_size"),  # no GPT-only keys
    ([], "model.patch_size", "lora.rank"),  # a GPT LoRA run: no ViT-only keys
])
def test_the_wandb_config_holds_only_what_applies_to_the_run(tmp_path, overrides, absent, present):
    from loralab.loggers import RunIdentity, wandb_config

    from conftest import compose

    config = wandb_config(compose([f"paths.output_dir={tmp_path}", *overrides]), RunIdentity("r", None, [], "abc"))
    assert present in config and config["setting_id"] == "abc"
    assert not [key for key in config if key.startswith(absent)]


@pytest.mark.slow
def test_a_sweep_in_wandb_as_a_dashboard_user_expects(tmp_path, base_cache):
    """``-m lora=default,full`` with the logger's settings, decoded from the offline run files."""
    import json

    from conftest import TINY, read_summary, run_train
    from wandb_offline import offline_runs

    sweep = tmp_path / "sweep"
    result = run_train(["-m", "lora=default,full", *TINY, "logger.group=ablation", "logger.tags=[tiny,e2e]",
                        "logger.notes=two jobs", f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path)
    runs = {job: next(r for r in offline_runs(sweep / job) if r.job_type == "finetune") for job in ("0", "1")}
    for job, run in runs.items():
        summary = read_summary(sweep / job)
        assert (run.group, run.tags, run.notes) == ("ablation", ["tiny", "e2e"], "two jobs")
        # every curve against the trainer's step; val/loss summarised by its last value, best/val_loss by its min
        assert run.metrics["*"]["step_metric"] == "trainer/global_step"
        logged = {key for row in run.history for key in row if not key.startswith("_")} - {"trainer/global_step"}
        assert {"train/loss", "val/loss", "test/loss", "forget/loss", "params/trainable"} <= logged
        assert all(row.get("trainer/global_step", -1) in range(13) for row in run.history)  # all on its axis
        assert run.metrics["val/loss"]["summary"] == ["last"] and run.metrics["best/val_loss"]["summary"] == ["min"]
        final = [row for row in run.history if "val/loss" in row][-1]
        assert final["trainer/global_step"] == 12 and final["val/loss"] == summary["metrics"]["val/loss"]
        assert run.summary["best/val_loss"] == summary["metrics"]["best/val_loss"]
        assert len(run.metric("lr-AdamW")) == 12
    lora, full = runs["0"], runs["1"]
    assert lora.config["lora.rank"] == 8 and not [key for key in full.config if key.startswith("lora.")]
    # the adapter as an artifact, with its config and its base's hash; the baseline has none
    [artifact] = [a for a in lora.artifacts if a["type"] == "lora-adapter"]
    adapter_config = json.loads((sweep / "0" / "adapter" / "adapter_config.json").read_text())
    assert artifact["metadata"] == {**adapter_config, "base_sha256": read_summary(sweep / "0")["base"]["sha256"]}
    assert artifact["files"] == ["adapter.safetensors", "adapter_config.json"]
    assert not [a for a in full.artifacts if a["type"] == "lora-adapter"]
    # the report as its own run in the sweep's group, where the sync command finds it
    [report] = offline_runs(sweep / "report")
    assert (report.job_type, report.group, report.tags) == ("report", "ablation", ["tiny", "e2e"])
    [logged] = report.history
    assert logged["report/settings/_type"] == "table-file" and logged["report/settings/nrows"] == 2
    for plot in ("loss_curves", "val_loss_vs_params"):
        assert logged[f"report/{plot}/_type"] == "image-file", plot
    # the console: each job announced, the table once, where the results are and how to upload them
    out = result.stdout
    assert out.index("job 1/2: lora=default") < out.index("job 2/2: lora=full") < out.index("Sweep report")
    assert out.count("Sweep report") == 1
    assert f"[loralab] results: {sweep} (report: {sweep / 'report.md'})" in out
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in out
    synced = {p.parent.parent.name for p in sweep.glob("*/wandb/offline-run-*")}
    assert synced == {"0", "1", "report"}


@pytest.mark.slow
def test_a_run_names_itself_and_can_skip_the_adapter_artifact(tmp_path, base_cache):
    from conftest import TINY, run_train
    from wandb_offline import offline_runs

    run_dir = tmp_path / "run"
    result = run_train([*TINY, "logger.name=my-run", "logger.log_adapter=false", f"paths.cache_dir={base_cache}",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    [run] = [r for r in offline_runs(run_dir) if r.job_type == "finetune"]
    assert run.name == "my-run" and run.group == ""
    assert not [a for a in run.artifacts if a["type"] == "lora-adapter"]
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()  # skipped in W&B only
    assert f"[loralab] results: {run_dir}\n" in result.stdout
    assert f"wandb sync {run_dir}/wandb/offline-run-*" in result.stdout


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
