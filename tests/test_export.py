"""python -m loralab.export on a run whose adapter is damaged: one line, exit 2, nothing written;
its hint for rebuilding a base quotes for the shell."""

import json
import math
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.adapters import save_adapter
from loralab.base import save_base
from loralab.export import how_to_rebuild
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT, GPTConfig

CONFIG = LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def run_dir(tmp_path):
    """What a completed LoRA run leaves for export: its adapter, recording the base file it was trained on."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=16))
    sha256 = save_base(base, tmp_path / "base.safetensors")
    inject_lora(base, CONFIG)
    save_adapter(base, CONFIG, tmp_path / "run" / "adapter",
                 base={"source": "checkpoint", "path": str(tmp_path / "base.safetensors"), "sha256": sha256})
    return tmp_path / "run"


def rewrite_weights(run_dir, change):
    path = run_dir / "adapter" / "adapter.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def rewrite_config(run_dir, change):
    path = run_dir / "adapter" / "adapter_config.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


EXTRA = "transformer.h.0.attn.k_proj.lora_A"  # k_proj is not among the adapter's targets


def first_key(tensors):
    return sorted(tensors)[0]


DAMAGE = {  # how the adapter is damaged -> what the one line says
    "wrong shape": (lambda d: rewrite_weights(d, lambda t: t.update({first_key(t): torch.zeros(3, 16)})),
                    "has shape (3, 16)"),
    "extra key": (lambda d: rewrite_weights(d, lambda t: t.update({EXTRA: torch.zeros(2, 16)})),
                  f"unexpected keys ['{EXTRA}']"),
    "missing key": (lambda d: rewrite_weights(d, lambda t: t.pop(first_key(t))), "missing keys"),
    "wrong rank in the config": (lambda d: rewrite_config(d, lambda m: m["lora"].update(rank=4)), "has shape"),
    "bad JSON": (lambda d: (d / "adapter" / "adapter_config.json").write_text('{"lora": {"rank": 2'),
                 "adapter_config.json cannot be read: JSONDecodeError"),
    "unknown config field": (lambda d: rewrite_config(d, lambda m: m["lora"].update(rnak=2)), "TypeError"),
    "truncated weights": (lambda d: (d / "adapter" / "adapter.safetensors").write_bytes(b"\x10\x00"), "does not load"),
    "NaN weights": (lambda d: rewrite_weights(d, lambda t: t[first_key(t)].fill_(math.nan)),
                    "holds NaN or inf weights"),
    "inf weights": (lambda d: rewrite_weights(d, lambda t: t[sorted(t)[-1]].fill_(math.inf)),
                    "holds NaN or inf weights"),
}


def export(run_dir, out, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m loralab.export RUN --merged OUT``, run in this process:
    an exception other than its exit would fail the test (a user would see a traceback)."""
    from loralab.export import main

    try:
        main([str(run_dir), "--merged", str(out)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_an_intact_adapter_exports(run_dir, tmp_path, capsys):
    assert export(run_dir, tmp_path / "out", capsys) == (0, "")
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_adapter_is_one_line_and_exit_2(run_dir, tmp_path, capsys, damage):
    spoil, says = DAMAGE[damage]
    spoil(run_dir)
    code, stderr = export(run_dir, tmp_path / "out", capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and says in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_a_qlora_run_as_peft_is_one_line_and_exit_2(tmp_path, capsys):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=64))
    sha256 = save_base(base, tmp_path / "base.safetensors")
    qlora = LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"], quantize="nf4")
    inject_lora(base, qlora)
    save_adapter(base, qlora, tmp_path / "run" / "adapter",
                 base={"source": "checkpoint", "path": str(tmp_path / "base.safetensors"), "sha256": sha256})
    from loralab.export import main

    with pytest.raises(SystemExit) as ended:
        main([str(tmp_path / "run"), "--peft", str(tmp_path / "peft")])
    stderr = capsys.readouterr().err
    assert ended.value.code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("error: the model's base is nf4-quantized (lora.quantize): a PEFT adapter goes onto ")
    assert stderr.endswith("(`python -m loralab.export RUN --merged OUT` dequantizes the base)\n")
    assert not (tmp_path / "peft").exists()


def test_the_rebuild_hint_quotes_paths_and_overrides_for_the_shell(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- data.train_path=my notes.txt\n- seed=1\n")
    cache = tmp_path / "cache dir; rm -rf x"
    hint = how_to_rebuild(run_dir, {"source": "cache", "path": str(cache / "base-1.safetensors")})
    command = hint.split("`")[1]
    assert shlex.split(command) == ["python", "train.py", "data.train_path=my notes.txt", "seed=1"]
    assert shlex.quote(str(cache)) in hint and shlex.quote(str(cache)) != str(cache)


@pytest.mark.parametrize("inside", ["adapter", ".", "checkpoints/x", ".hydra"])
def test_export_never_writes_into_the_runs_own_files(run_dir, capsys, inside):
    from loralab.export import main

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as ended:
        main([str(run_dir), "--peft", str(run_dir / inside)])
    assert ended.value.code == 2 and "is inside the run's own files" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_export_may_write_beside_the_runs_own_files(run_dir, capsys):
    assert export(run_dir, run_dir / "merged", capsys) == (0, "")
