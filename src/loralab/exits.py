"""How a run or a sweep ends: its exit code, and an error as the lines that say what is wrong.

Exit codes of ``python train.py`` (a script can tell the outcomes apart):

    0  completed: the run, or every job of the sweep
    1  failed: an error during a run (the traceback is printed; for a checkpoint that cannot
       be read safely, one line naming it), or it trained another number of steps than asked
    2  invalid config: its problems, one line each and nothing else (no run started); or a
       run directory it may not write into (``loralab.resume``)
    3  diverged: the loss became NaN or inf (in a sweep: no job failed, at least one diverged)
    4  interrupted: SIGTERM or SIGINT stopped the run at a step boundary, its checkpoint
       saved (``loralab.interrupts``); a sweep stops at that job. ``resume=true`` continues it

Hydra prints an error as a header, the message, and a hint about HYDRA_FULL_ERROR;
a config error printed that way is four lines for one. So ``run`` lets Hydra raise
(HYDRA_FULL_ERROR=1) and prints errors itself, and ``ExitCode`` (a Hydra callback,
conf/train.yaml) ends a single run with its own code before Hydra reports the job.
Importing this module is fast: no Lightning.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import Counter
from pathlib import Path

from hydra.errors import CompactHydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from loralab.layout import job_dirs, run_status

EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 4
STATUS_EXIT = {"completed": 0, "failed": EXIT_FAILED, "diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}


def run(hydra_main) -> None:
    """Call a ``@hydra.main`` function; end the process with the exit code above."""
    user_wants_full_errors = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing
    try:
        hydra_main()
    except CompactHydraException as e:  # composing, the sweeper's checks: nothing has run
        if user_wants_full_errors:
            raise
        sys.stderr.write("\n".join(config_error_lines(e)) + "\n")
        sys.exit(EXIT_CONFIG)
    except Exception as e:  # a job's error, raised again by Hydra's sweeper after the batch
        if user_wants_full_errors:
            raise
        sys.stderr.write(job_error(e))
        sys.exit(EXIT_FAILED)


def config_error_lines(error: CompactHydraException) -> list[str]:
    """One line per problem, naming the key: loralab's ConfigError is that already; Hydra's
    composition errors (an unknown key, a wrong type, an unknown group option) are made so."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    config = sys.modules.get("loralab.config")  # a ConfigError exists only once that module is imported
    if config is not None and isinstance(error, config.ConfigError):
        return str(error).splitlines()
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return [f"{group}={name!r} is invalid: expected one of {sorted(error.options)}"]
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return [f"unknown config key {cause.full_key!r}: {cause.full_key.rpartition('.')[0] or 'the config'} "
                f"has no such key (see `python train.py --cfg job`)"]
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return [f"{cause.full_key}={cause.value!r} is invalid: {cause.msg.strip().splitlines()[0]}"]
    return ["; ".join(one_line(str(part)) for part in (error, cause) if part is not None and str(part).strip())]


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def job_error(error: BaseException) -> str:
    """What a failed job prints: one line when the error names the file at fault and the way
    on (a checkpoint that cannot be read safely), else its traceback."""
    checkpoints = sys.modules.get("loralab.checkpoints")  # the error exists only once that module is imported
    if checkpoints is not None and isinstance(error, checkpoints.CheckpointError):
        return f"{error}\n"
    return job_traceback(error)


def job_traceback(error: BaseException) -> str:
    """The traceback from the task function down, without Hydra's frames above it."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_name != "run_job":
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb.tb_next if tb else error.__traceback__))


def sweep_exit_code(statuses: list[str | None]) -> int:
    """Failed (or no summary at all) before diverged before completed."""
    codes = [STATUS_EXIT.get(status, EXIT_FAILED) for status in statuses]
    return EXIT_FAILED if EXIT_FAILED in codes else max(codes, default=0)


def output_dir(job_return) -> str:
    """The job's paths.output_dir: it interpolates Hydra's config, which Hydra has unset by now."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(job_return.hydra_cfg)
    return job_return.cfg.paths.output_dir


class ExitCode(Callback):
    """Ends ``python train.py`` with the exit code of what happened (the table above)."""

    def on_run_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        from loralab.config import ConfigError  # here: importing it imports Lightning

        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the public return_value prints Hydra's header and raises
            if isinstance(error, ConfigError):
                sys.stderr.write(f"{error}\n")
                sys.exit(EXIT_CONFIG)
            sys.stderr.write(job_error(error))
            sys.exit(EXIT_FAILED)
        code = STATUS_EXIT.get(run_status(output_dir(job_return)))
        if code:  # diverged, or failed without an exception (it trained fewer steps than asked)
            sys.exit(code)

    def on_multirun_end(self, config, **kwargs) -> None:
        """Hydra calls this only when no job raised: what is left to say is divergence."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = [run_status(job_dir) for job_dir in job_dirs(sweep_dir)]
        code = sweep_exit_code(statuses)
        if code:
            tally = ", ".join(f"{n} {status or 'without summary.json'}" for status, n in Counter(statuses).items())
            print(f"[loralab] sweep {sweep_dir}: {tally} (exit {code})", flush=True)
            sys.exit(code)
