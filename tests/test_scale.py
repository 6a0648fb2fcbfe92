"""From laptop to cluster: the same sweep through Hydra's other launchers (submitit, Ray),
Lightning DDP inside a multirun, an Optuna search, and the SLURM launcher's settings.

Each launcher test checks the contract every launcher must keep: one summary.json and one
W&B run per job, the base pretrained once for the whole sweep, the sweep report complete.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from loralab.distributed import trainable_digest

from conftest import ROOT, TINY, run_train
from wandb_offline import offline_runs

PRETRAINED = "No cached base model for these settings: pretraining one into"  # loralab.base, once per base


def plugin(name: str):
    """Skip the test when the Hydra plugin ``name`` (an extra of pyproject.toml) is not installed."""
    installed = importlib.util.find_spec(f"hydra_plugins.{name}") is not None
    return pytest.mark.skipif(not installed, reason=f"{name.replace('_', '-')} is not installed")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def tiny_qv_lora_params(rank: int) -> int:
    """r·(in + out) for q_proj and v_proj (64 -> 64) in each of the tiny model's 2 layers."""
    return 2 * 2 * rank * (64 + 64)


def check_rank_sweep(sweep: Path, ranks: tuple[int, ...]) -> None:
    """One completed job per rank, each with its summary, its adapter and its own W&B run,
    and a report with one row per job."""
    for job, rank in enumerate(ranks):
        s = summary(sweep / str(job))
        assert s["status"] == "completed" and s["name"] == f"lora.rank={rank}"
        assert s["metrics"]["params/trainable"] == tiny_qv_lora_params(rank) == s["metrics"]["params/lora_analytic"]
        assert s["metrics"]["lora/merge_ok"]
        assert (sweep / str(job) / "adapter" / "adapter.safetensors").is_file()
        [run] = [r for r in offline_runs(sweep / str(job)) if r.job_type == "finetune"]
        assert run.config["lora.rank"] == rank and run.exit_code == 0
    report = (sweep / "report.md").read_text()
    assert f"{len(ranks)} runs: {len(ranks)} completed." in report
    assert all(f"| {job} | lora.rank={rank} | completed |" in report for job, rank in enumerate(ranks))


def job_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted(sweep.glob("*/*.log")))


# --- launchers -------------------------------------------------------------------------


@pytest.mark.slow
@plugin("hydra_submitit_launcher")
def test_submitit_local_runs_each_job_in_its_own_process_with_one_shared_base(tmp_path):
    """hydra/launcher=submitit_local: the jobs run at the same time in submitit worker
    processes; the relative cache path names one cache, and the file lock makes one job
    pretrain the base while the other waits for it."""
    sweep = tmp_path / "sweep"
    run_train(["-m", "hydra/launcher=submitit_local", "lora.rank=2,4", *TINY, "paths.cache_dir=cache",
               f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    check_rank_sweep(sweep, (2, 4))
    assert len(list((tmp_path / "cache").glob("base-*.safetensors"))) == 1
    assert job_logs(sweep).count(PRETRAINED) == 1
    workers = list((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(workers) == 2  # one submitit job per Hydra job
    assert all("Job completed successfully" in p.read_text() for p in workers)


@pytest.mark.slow
@plugin("hydra_ray_launcher")
def test_ray_launcher_runs_the_sweep_on_a_local_ray_instance(tmp_path, base_cache):
    """hydra/launcher=ray with no address: Ray starts a local instance for the sweep
    (2 CPUs, no dashboard) and runs each job as a Ray task."""
    sweep = tmp_path / "sweep"
    result = run_train(["-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                        "+hydra.launcher.ray.init.include_dashboard=false", "lora.rank=2,4", *TINY,
                        f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert "Started a local Ray instance" in result.stdout + result.stderr
    check_rank_sweep(sweep, (2, 4))


def test_slurm_launcher_asks_for_what_the_trainer_uses(tmp_path):
    """hydra/launcher=slurm: GPUs and tasks per node follow trainer.devices, and submitit
    turns the settings into the sbatch directives a cluster reads."""
    submitit = pytest.importorskip("submitit", reason="hydra-submitit-launcher is not installed")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import loralab.schema  # noqa: F401  registers train_schema, as train.py does

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4", "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=90"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.array_parallelism) == (4, 4, 32)
    assert (cfg.trainer.strategy, cfg.trainer.precision) == ("ddp", "bf16-mixed")

    # the sbatch file submitit's SlurmExecutor writes (it refuses to start where there is no srun)
    sbatch = submitit.slurm.slurm._make_sbatch_string(
        command="python train.py", folder=tmp_path, partition=launcher.partition, time=launcher.timeout_min,
        nodes=launcher.nodes, gpus_per_node=launcher.gpus_per_node, ntasks_per_node=launcher.tasks_per_node,
        cpus_per_task=launcher.cpus_per_task, mem=f"{launcher.mem_gb}GB")
    for directive in ("--partition=gpu", "--time=90", "--gpus-per-node=4", "--ntasks-per-node=4",
                      f"--cpus-per-task={launcher.cpus_per_task}"):
        assert f"#SBATCH {directive}\n" in sbatch, directive


# --- DDP -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_single_ddp_run_trains_on_two_processes_in_its_one_directory(tmp_path, base_cache):
    """Rank 1 runs the same command into the same hydra.run.dir, which rank 0 holds: it is not
    refused as a second writer."""
    run_dir = tmp_path / "run"
    result = run_train(["trainer=ddp", "trainer.devices=2", *TINY, "logger=none", f"paths.cache_dir={base_cache}",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["metrics"]["ddp/world_size"] == 2 and s["metrics"]["ddp/replicas_identical"]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()
    assert result.stdout.count(": completed") == 1  # rank 1 records nothing


@pytest.mark.slow
def test_ddp_multirun_trains_each_job_on_two_processes_and_records_it_once(tmp_path, base_cache):
    """``-m lora.rank=2,4 trainer=ddp trainer.devices=2``: Lightning re-runs the command for
    rank 1, which must run its own job only (not a sweep of its own); rank 0 alone writes."""
    sweep = tmp_path / "sweep"
    result = run_train(["-m", "lora.rank=2,4", "trainer=ddp", "trainer.devices=2", *TINY,
                        f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    launched = [line for line in result.stdout.splitlines() if "[HYDRA] \t#" in line]
    assert len(launched) == 2, "a DDP rank started a sweep of its own:\n" + "\n".join(launched)
    check_rank_sweep(sweep, (2, 4))
    for job, rank in enumerate((2, 4)):
        s = summary(sweep / str(job))
        assert s["metrics"]["ddp/world_size"] == 2
        assert s["metrics"]["ddp/replicas_identical"]  # every rank ends with the adapter rank 0 saved
        rank_1_log = (sweep / str(job) / "train_ddp_process_1.log").read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank_1_log and f"LoRA r={rank} on 4 modules" in rank_1_log
        assert result.stdout.count(f"[loralab] lora.rank={rank}: completed") == 1  # rank 1 records nothing
    finetune = sorted(r.name for r in offline_runs(sweep) if r.job_type == "finetune")
    assert finetune == ["lora.rank=2", "lora.rank=4"]  # rank 1 opened none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # rank 1 left no run directory elsewhere


def test_trainable_digest_tells_apart_adapters_one_ulp_apart():
    from loralab.lora import LoRAConfig, inject_lora
    from loralab.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    inject_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=["q_proj"]))
    before = trainable_digest(model)
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        frozen.add_(1.0)
    assert trainable_digest(model) == before  # only the trainable weights count
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora_a[0, 0] = torch.nextafter(lora_a[0, 0], torch.tensor(math.inf))
    assert trainable_digest(model) != before
    assert 0 <= before < 2**63  # fits the int64 tensor that the ranks all-gather


# --- Optuna ----------------------------------------------------------------------------


def trial_params(job_dir: Path, searched=("lora.rank", "lora.alpha", "optim.lr", "lora/targets")) -> dict:
    """The values Optuna chose for this trial, parsed from the job's Hydra overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.value() for o in parsed if o.key_or_group in searched}


@pytest.mark.slow
@plugin("hydra_optuna_sweeper")
def test_optuna_search_writes_the_best_trial_of_the_runs_it_made(tmp_path, base_cache):
    sweep = tmp_path / "sweep"
    run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=4", *TINY, "trainer.max_steps=20",
               "logger=none", f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted((d for d in sweep.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    assert [d.name for d in jobs] == ["0", "1", "2", "3"]
    objective = {d.name: summary(d)["metrics"]["best/val_loss"] for d in jobs}
    best_job = min(objective, key=objective.get)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(objective[best_job], rel=1e-12)
    assert result["best_params"] == trial_params(sweep / best_job)
    for d in jobs:
        s = summary(d)
        rank, targets = trial_params(d)["lora.rank"], trial_params(d)["lora/targets"]
        assert s["config"]["lora"]["rank"] == rank and s["metrics"]["params/trainable"] > 0
        assert s["history"]["train/loss"][-1][0] == 20  # trainer.max_steps=20 reached the job
        assert len(s["history"]["train/loss"]) == 20 and targets in ("qv", "qkvo", "all")
    assert (sweep / "report.md").read_text().count("| completed |") == 4


@pytest.mark.slow
@plugin("hydra_optuna_sweeper")
def test_optuna_search_records_failed_and_diverged_trials_and_goes_on(tmp_path, base_cache):
    """The settings of hparams_search=optuna over lr in {-1, 1e30, 3e-3}: lr=-1 fails the
    config check (the job raises), lr=1e30 diverges, and the search still ends with the good
    trial as its best. The seeded sampler draws all three in 6 trials (some twice); the sweep
    exits 1 because a trial failed (loralab's exit codes), having run every trial."""
    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    (tmp_path / "conf" / "hparams_search" / "failures.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - optuna\n  - _self_\n"
        "hydra:\n  sweeper:\n    params:\n"
        "      lora.rank: choice(4)\n      lora.alpha: choice(8)\n      lora/targets: choice(qv)\n"
        "      optim.lr: choice(-1, 1e30, 3e-3)\n")
    sweep = tmp_path / "sweep"
    result = run_train(["-m", f"--config-dir={tmp_path / 'conf'}", "hparams_search=failures",
                        "hydra.sweeper.n_trials=6",
                        *TINY, "trainer.gradient_clip_val=null", "logger=none", f"paths.cache_dir={base_cache}",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert len([d for d in sweep.iterdir() if d.name.isdigit()]) == 6  # the search went on after failures
    by_lr = {trial_params(d, ("optim.lr",))["optim.lr"]: summary(d) for d in sweep.iterdir() if d.name.isdigit()}
    assert sorted(by_lr) == [-1, 3e-3, 1e30]
    assert by_lr[-1]["status"] == "failed" and "optim.lr=-1.0 is invalid" in by_lr[-1]["error"]
    assert "Failed experiment: optim.lr=-1.0 is invalid" in result.stdout  # told to Optuna as FAIL; the search went on
    assert by_lr[1e30]["status"] == "diverged"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"lora.rank": 4, "lora.alpha": 8, "optim.lr": 3e-3, "lora/targets": "qv"}
    assert best["best_value"] == by_lr[3e-3]["metrics"]["best/val_loss"]


# --- missing plugins -------------------------------------------------------------------


def test_a_missing_plugin_is_one_line_naming_the_extra(monkeypatch):
    from loralab import plugins

    monkeypatch.setitem(plugins.PLUGINS, "hydra/launcher=ray",
                        ("hydra_plugins.not_installed_launcher", "hydra-ray-launcher", "ray"))
    with pytest.raises(SystemExit) as exit_:
        plugins.require_plugins(["-m", "lora.rank=2,4", "hydra/launcher=ray"])
    assert str(exit_.value) == ('hydra/launcher=ray needs the hydra-ray-launcher package: pip install -e ".[ray]" '
                                '(or pip install hydra-ray-launcher)')
    plugins.require_plugins(["-m", "lora.rank=2,4", "hydra/launcher=basic"])  # Hydra's own: nothing to install


def test_every_plugin_extra_is_in_pyproject():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from loralab.plugins import PLUGINS

    for choice, (_, package, extra) in PLUGINS.items():
        assert any(req.startswith(package) for req in extras[extra]), (choice, extra)
