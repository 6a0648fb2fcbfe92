"""Run naming and W&B mode selection (loggers.py)."""

import pytest

from loralab.loggers import flatten, swept_keys, wandb_mode


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


def test_swept_keys_from_the_command_line_and_from_an_experiment(tmp_path):
    assert swept_keys(tmp_path) is None  # no multirun.yaml: not a sweep Hydra wrote
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: ['lora.rank=4,8', 'model=tiny', 'lora/targets=qv,all']\n"
        "  sweeper:\n    params:\n      lora.alpha: 1,2\n")
    assert swept_keys(tmp_path) == {"lora.rank", "lora/targets", "lora.alpha"}
