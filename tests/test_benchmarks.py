"""The benchmark scripts run end to end at small sizes and report consistent numbers."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def test_attention_benchmark_reports_the_flop_ratio_and_speedup(tmp_path):
    out = tmp_path / "attention.json"
    run_script(
        "attention.py",
        *("--seq-lens", "256,512", "--segment-lengths", "64,128", "--dilation-rates", "1,2"),
        *("--repeats", "2", "--linear-reference", "256", "--json", str(out)),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["seq_len"] for row in rows] == [256, 512]
    for row in rows:
        n, heads = row["seq_len"], 8
        # w = 64, r = 1: every head keeps all 64 positions of n / 64 segments; w = 128, r = 2:
        # every head keeps 64 positions of n / 128 segments.
        dilated = heads * (n // 64 + n // 128) * causal_pairs(64)
        assert row["ideal_ratio"] == heads * causal_pairs(n) / dilated
        times = row["dilated"], row["dense"]
        assert row["speedup_fwd_bwd"] == times[1]["fwd_bwd_s"] / times[0]["fwd_bwd_s"]
        assert all(t["fwd_s"] > 0 and t["fwd_bwd_s"] > t["fwd_s"] * 0.5 for t in times)
        assert all(t["fwd_bwd_peak_bytes"] > 0 for t in times)
    assert rows[0]["time_per_token_rel"] == 1.0 and rows[0]["peak_per_token_rel"] == 1.0


def test_kernel_ceiling_times_the_calls_of_every_pattern():
    stdout = run_script("kernel_ceiling.py", "--seq-len", "4096", "--repeats", "1")
    rows = re.findall(r"^\s+(w=\d+ r=\d+ c=\d+|dense)\s+(\d+)\s", stdout, flags=re.MULTILINE)
    pairs = {}
    for name, count in rows:  # a pattern's calls may share a name: add them up
        pairs[name] = pairs.get(name, 0) + int(count)
    heads, n = 8, 4096
    assert pairs.pop("dense") == heads * causal_pairs(n)
    # The paper's patterns over 4096 tokens: w = 8192 and up cover the sequence in one segment.
    # Head j keeps positions j mod r, j mod r + r, ...: with r = 6 the heads at offsets 0..3
    # (heads 0, 1, 2, 3, 6, 7) keep 683 positions, those at 4 and 5 keep 682; with r = 12 the
    # heads 0..3 keep 342 and 4..7 keep 341.
    expected = {
        "w=2048 r=1 c=2048": 2 * heads * causal_pairs(2048),
        "w=4096 r=2 c=2048": heads * causal_pairs(2048),
        "w=4096 r=4 c=1024": heads * causal_pairs(1024),
        "w=4096 r=6 c=683": 6 * causal_pairs(683),
        "w=4096 r=6 c=682": 2 * causal_pairs(682),
        "w=4096 r=12 c=342": 4 * causal_pairs(342),
        "w=4096 r=12 c=341": 4 * causal_pairs(341),
    }
    assert pairs == expected
    ratio = re.search(r"kernel-only speedup ([\d.]+)x of the ideal ([\d.]+)x", stdout)
    assert ratio is not None
    assert float(ratio.group(2)) == round(heads * causal_pairs(n) / sum(expected.values()), 2)


def test_lm_loss_benchmark_gets_one_loss_both_ways():
    stdout = run_script("lm_loss.py", "--seq-len", "256", "--vocab-size", "1000", "--repeats", "1")
    losses = re.findall(r"(full logits|chunked): loss ([\d.]+)", stdout)
    assert [name for name, _ in losses] == ["full logits", "chunked"]
    assert abs(float(losses[0][1]) - float(losses[1][1])) < 1e-5
    assert abs(float(losses[0][1]) - math.log(1000)) < 1.0  # near-uniform at initialisation
