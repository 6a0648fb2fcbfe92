"""`python -m loralab.savings` end to end on the tiny shape: every ratio, with sane values."""

import json
import math
import subprocess
import sys

import pytest

from loralab.savings import RATIOS


@pytest.mark.slow
def test_savings_benchmark_writes_every_ratio(tmp_path):
    out = tmp_path / "savings.json"
    run = subprocess.run([sys.executable, "-m", "loralab.savings", "--model", "tiny", "--batch", "2", "--seq", "32",
                          "--steps", "2", "--warmup", "1", "--new-tokens", "32", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    ratios = results["ratios"]
    assert set(ratios) == {name for name, *_ in RATIOS}
    assert all(name in run.stdout for name in ratios)
    assert all(v is not None and math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    train = results["train"]
    assert set(train) >= {"full", "lora", "qlora_int8", "qlora_nf4"}
    # r·(in + out) for q_proj and v_proj in each of the tiny model's 2 layers, at rank 8
    assert train["lora"]["trainable"] == train["qlora_nf4"]["trainable"] == 2 * 2 * 8 * (64 + 64)
    assert train["full"]["trainable"] == results["spec"]["params"]
    # DoRA adds one magnitude per output of each adapted layer; PiSSA only changes the init
    assert train["dora"]["trainable"] == train["lora"]["trainable"] + 2 * 2 * 64
    assert train["pissa"]["trainable"] == train["lora"]["trainable"]
    if "peft_dora" in train:  # the same parameters as PEFT's own variants
        assert train["peft_dora"]["trainable"] == train["dora"]["trainable"]
        assert train["peft_pissa"]["trainable"] == train["pissa"]["trainable"]
    assert ratios["nf4_vs_fp32_weight_bytes"] <= 0.3
    assert ratios["adapter_vs_full_bytes"] < 0.1  # 4,096 adapter parameters against 120,576
