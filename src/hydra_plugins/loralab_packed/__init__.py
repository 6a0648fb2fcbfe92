"""loralab's packed launcher (``hydra/launcher=packed``): the compatible LoRA jobs of a sweep
train together over one frozen base (``loralab.pack_sweep``), and every job then runs as its
own run, through Hydra's ``run_job`` like the basic launcher's jobs: its directory, ``.hydra/``,
the job callbacks (the sweep report, the exit code) and its return value are a solo job's.
Jobs that cannot pack run on their own in the same sweep; one line says which and why.
It lives in Hydra's ``hydra_plugins`` namespace because Hydra instantiates launchers only from there.
"""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from loralab.layout import HYDRA_OVERRIDES

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.loralab_packed.PackedLauncher"
    pack_size: Optional[int] = None  # most jobs in one pack (null: all the compatible jobs)


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="loralab")


class PackedLauncher(BasicLauncher):
    def __init__(self, pack_size: Optional[int] = None) -> None:
        super().__init__()
        if pack_size is not None and pack_size < 1:
            raise ValueError(f"hydra.launcher.pack_size={pack_size} is invalid: expected a positive integer or null")
        self.pack_size = pack_size

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Train the packs, then run every job, in job order, as its solo run (a packed job
        continuing from the checkpoint its pack left)."""
        from loralab.pack_sweep import plan, train_pack
        from loralab.run import train

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self.job_config(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        packs, alone = plan([job_settings(c) for c in configs], self.pack_size)
        print(plan_line(packs, alone, initial_job_idx), flush=True)
        for pack in packs:
            for i in pack:  # the job is in its directory from now on: resume=true continues only it there
                save_overrides(configs[i])
            HydraConfig.instance().set_config(configs[pack[0]])
            train_pack([job_settings(configs[i]) for i in pack], [job_dir(configs[i]) for i in pack],
                       resume=bool(self.config.get("resume", False)))
        packed = {i for pack in packs for i in pack}
        runs: List[JobReturn] = []
        for i, config in enumerate(configs):
            task = functools.partial(train, packed=True) if i in packed else self.task_function
            runs.append(run_job(hydra_context=self.hydra_context, task_function=task, config=config,
                                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    def job_config(self, overrides: Sequence[str], number: int) -> DictConfig:
        """Job ``number``'s config, as the basic launcher composes it."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = number
        return config


def job_dir(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)


def save_overrides(config: DictConfig) -> None:
    """The job's ``.hydra/overrides.yaml``, as Hydra writes it when the job starts."""
    path = job_dir(config) / HYDRA_OVERRIDES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(config.hydra.overrides.task))


def job_settings(config: DictConfig) -> DictConfig:
    """The job's own settings, without Hydra's, writing into its job directory."""
    settings = config.copy()
    with open_dict(settings):
        settings.paths.output_dir = str(job_dir(config))
        del settings["hydra"]
    return settings


def plan_line(packs: List[List[int]], alone: dict, first: int) -> str:
    """One line: which jobs train packed, which alone and why (job numbers as their directories)."""
    packed = "; ".join(f"jobs {', '.join(str(first + i) for i in pack)}" for pack in packs) or "none"
    line = f"[loralab] packed: {packed}"
    if alone:
        line += " | on their own: " + "; ".join(f"job {first + i} ({why})" for i, why in alone.items())
    return line
