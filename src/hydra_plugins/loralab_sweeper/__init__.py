"""loralab's sweeper: Hydra's basic sweeper with two things a LoRA sweep needs
(``hydra/sweeper=loralab``, the default in conf/train.yaml). It lives in Hydra's
``hydra_plugins`` namespace because Hydra instantiates sweepers only from there.

- **The baseline in the same sweep.** ``-m lora=default,full lora.rank=4,8 seed=1,2``
  is a cartesian product in which the full fine-tuning baseline would run once per
  rank, though ``lora.*`` keys mean nothing to it. Jobs that differ only in keys of
  the section a group option switched off are one job: full fine-tuning runs once
  per seed.
- **Every job checked before any job runs.** Hydra already composes every job's
  config before launching; this sweeper also runs loralab's semantic checks
  (``loralab.config.validate``) on each, so a bad value in the fifth job stops the
  sweep before the first job pretrains or trains.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

# group option -> the key prefix it makes irrelevant
SWITCHED_OFF = {"lora=full": "lora."}


@dataclass
class LoRASweeperConf:
    _target_: str = "hydra_plugins.loralab_sweeper.LoRASweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="loralab", node=LoRASweeperConf, provider="loralab")


def without_redundant_jobs(jobs: List[List[str]]) -> List[List[str]]:
    """Drop a job when it equals an earlier one once the keys its group options switch off
    are left out (``lora=full`` ignores ``lora.rank=...``); the first of each stays."""
    seen, kept = set(), []
    parser = OverridesParser.create()
    for job in jobs:
        parsed = parser.parse_overrides(job)
        options = {o.input_line.lstrip("+~") for o in parsed}
        off = tuple(prefix for option, prefix in SWITCHED_OFF.items() if option in options)
        relevant = tuple(o.input_line for o in parsed if not (off and o.key_or_group.startswith(off)))
        if relevant not in seen:
            seen.add(relevant)
            kept.append(job)
    return kept


class LoRASweeper(BasicSweeper):
    @staticmethod
    def split_arguments(overrides, max_batch_size: Optional[int]) -> List[List[List[str]]]:
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs = without_redundant_jobs(jobs)
        size = max_batch_size or len(jobs) or 1
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]

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
