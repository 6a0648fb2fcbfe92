"""loralab's sweeper (``hydra/sweeper=loralab``, the default in conf/train.yaml): Hydra's
basic sweeper over loralab's jobs. It lives in Hydra's ``hydra_plugins`` namespace because
Hydra instantiates sweepers only from there; what it does lives in loralab:

- **The baseline in the same sweep.** Jobs are expanded by ``loralab.jobs.expand``: full
  fine-tuning runs once per seed in ``-m lora=default,full lora.rank=4,8 seed=1,2``.
- **Every job checked before any job runs.** Hydra already composes every job's config
  before launching; this sweeper also runs loralab's semantic checks
  (``loralab.config.validate``) on each, so a bad value in the fifth job stops the sweep
  before the first job pretrains or trains.
- **No result overwritten.** A sweep directory that holds jobs is refused, or with
  ``resume=true`` continued: finished jobs are skipped, the others launched under their
  own job numbers (``loralab.resume``).
- **An interrupted job ends the sweep.** SIGTERM or SIGINT stops the job at a step boundary,
  checkpointed; the jobs after it do not start, the report is written, and ``resume=true``
  continues from that job (``loralab.interrupts``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from loralab.jobs import contiguous_batches, expand
from loralab.layout import MULTIRUN_YAML


@dataclass
class LoRASweeperConf:
    _target_: str = "hydra_plugins.loralab_sweeper.LoRASweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="loralab", node=LoRASweeperConf, provider="loralab")


class LoRASweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        """BasicSweeper.sweep over ``loralab.jobs.expand``, minus the jobs the sweep directory
        already holds: refuse the directory, or with ``resume=true`` launch only the unfinished
        jobs, each contiguous run of them with its first job number (``initial_job_idx``), so
        every job keeps its number and directory. All jobs to run are checked before the first starts."""
        from loralab.resume import jobs_to_run
        from loralab.sweep_console import end_sweep

        jobs = expand(self._parse_config() + list(arguments), self.hydra_context.config_loader)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        resume = bool(self.config.get("resume", False))
        todo = jobs_to_run(sweep_dir, jobs, [self.job_dir(job, i) for i, job in enumerate(jobs)], resume)
        self.validate_batch_is_legal([jobs[i] for i in todo])
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / MULTIRUN_YAML)
        returns = []
        try:
            for first, batch in contiguous_batches(todo, self.max_batch_size):
                results = self.launcher.launch([jobs[i] for i in batch], initial_job_idx=first)
                for r in results:
                    _ = r.return_value  # raises a failed job's error, as BasicSweeper does
                returns.append(results)
        except BaseException:  # a job's error, or an interrupted job (a SystemExit: the sweep stops there)
            end_sweep(self.config)  # Hydra's on_multirun_end, which it skips once a job raised
            raise
        return returns

    def job_dir(self, overrides: List[str], number: int) -> Path:
        """Where the launcher runs job ``number``: hydra.sweep.dir / hydra.sweep.subdir."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = number
        return Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)

    def validate_batch_is_legal(self, batch: List[List[str]]) -> None:
        """Compose each job's config, as Hydra does, and run loralab's checks on it: all
        problems of all jobs at once, each line naming its job."""
        from loralab.config import ConfigError, validate
        from loralab.overrides import sweep_label, varying_keys

        problems, swept = [], varying_keys(batch)
        for overrides in batch:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):  # the job's own settings; Hydra's are set only once it runs
                cfg.paths.output_dir = cfg.hydra.sweep.dir
                del cfg["hydra"]
            try:
                validate(cfg)
            except ConfigError as e:
                label = sweep_label(overrides, swept) or " ".join(overrides)
                problems += [f"job [{label}]: {line}" for line in str(e).splitlines()]
        if problems:
            raise ConfigError("\n".join(problems))
