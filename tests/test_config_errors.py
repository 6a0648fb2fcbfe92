"""Every bad input is refused before any work, in one line naming the key, the value and what
is allowed: the config's own checks, Hydra's composition errors, and train.py as a user runs it."""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from loralab.config import ConfigError, Problems, check_cache_dir, validate
from loralab.exits import EXIT_CONFIG, config_error_lines
from loralab.resume import SweepDirError, check_run_dir

from conftest import TINY, compose, run_train

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
    (tmp_path / "a_file").write_text("")
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
    ("paths.cache_dir=a_file", "paths.cache_dir='a_file' is invalid",
     "a directory this process can create and write in; {files}/a_file is a file, not a directory"),
    ("paths.cache_dir=a_file/cache", "paths.cache_dir='a_file/cache' is invalid", "a_file is a file, not a directory"),
    (f"paths.cache_dir=cache/{'x' * 256}", f"paths.cache_dir='cache/{'x' * 256}' is invalid",
     "its name xxxxxxxxxxxxxxxxxxxxxxxx... is 256 bytes long; this file system allows 255"),
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
    assert only.startswith(line) and detail.format(files=files) in only, only
    assert not cache.exists() and not (files / "run").exists()  # nothing was built or written


@contextmanager
def as_a_user():
    """The block runs with a user's rights (nobody's), when this process is root: root writes
    into read-only directories, which a user's run cannot."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_read_only_cache_or_run_directory_is_one_line_before_any_work():
    with tempfile.TemporaryDirectory() as tmp:
        read_only = Path(tmp)
        read_only.chmod(0o555)  # readable, not writable
        problems = Problems()
        with as_a_user():  # only the check: nobody may not read this interpreter's own files under /root
            check_cache_dir(str(read_only / "cache"), problems)
        assert problems.lines == [f"paths.cache_dir='{read_only / 'cache'}' is invalid: expected a directory this "
                                  f"process can create and write in; {read_only} is read-only for this process"]
        cfg = compose([*TINY, "paths.output_dir=unused"])
        with as_a_user(), pytest.raises(SweepDirError) as error:
            check_run_dir(read_only / "run", cfg, resume=False)
        assert str(error.value) == (f"hydra.run.dir='{read_only / 'run'}' is invalid: expected a directory this "
                                    f"process can create and write in; {read_only} is read-only for this process")
        assert list(read_only.iterdir()) == []


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


@pytest.mark.slow
@pytest.mark.parametrize("overrides,line", [
    ("seed=abc", "seed='abc' is invalid: Value 'abc' of type 'str' could not be converted to Integer"),
    ("base.max_bytes=100", "base.max_bytes=100 is invalid: expected text for at least one block of the model "
                           "(65 tokens) in each split; it holds 5 in the validation split (val_fraction=0.05)"),
    ("data=text data.train_path=binary.bin", "data.train_path='binary.bin' is invalid: expected a readable UTF-8 "
                                             "text file; binary.bin holds NUL bytes: a binary file, not text"),
    ("paths.cache_dir=a_file", "paths.cache_dir='a_file' is invalid: expected a directory this process can create "
                               "and write in; {files}/a_file is a file, not a directory"),
])
def test_a_bad_input_prints_its_line_alone_and_does_no_work(files, overrides, line):
    started = time.time()
    result = run_train([*TINY, *overrides.split(), f"hydra.run.dir={files / 'run'}"], cwd=files,
                       check=False)
    wall_s = time.time() - started
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == line.format(files=files) + "\n" and result.stdout == ""
    assert not (files / "outputs" / "cache").exists()  # the default cache: nothing pretrained
    assert wall_s < 90  # imports only (slower on a loaded machine); pretraining the default base takes minutes


@pytest.mark.slow
def test_a_run_or_job_directory_it_cannot_make_is_one_line_before_any_work(tmp_path):
    long = "x" * 256  # one more byte than a name may have (NAME_MAX) on Linux's file systems
    why_not = "is invalid: expected a directory this process can create and write in; its name " + "x" * 24 + "..."
    limit = "this file system allows 255\n"
    single = run_train([*TINY, f"hydra.run.dir={tmp_path / long}"], cwd=tmp_path, check=False)
    assert single.returncode == EXIT_CONFIG and single.stdout == ""
    assert single.stderr == f"hydra.run.dir='{tmp_path / long}' {why_not} is 256 bytes long; {limit}"
    sweep = run_train(["-m", "lora.rank=2,4", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                       f"hydra.sweep.subdir={long}_${{hydra.job.num}}"], cwd=tmp_path, check=False)
    assert sweep.returncode == EXIT_CONFIG
    assert sweep.stderr == f"hydra.sweep.subdir='{long}_0' {why_not} is 258 bytes long; {limit}"
    assert list(tmp_path.iterdir()) == []  # nothing was written
