"""The benchmark scripts run end to end at small sizes and report consistent numbers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    out, png = tmp_path / "attention.json", tmp_path / "attention.png"
    run_script(
        "attention.py",
        *("--seq-lens", "256,512", "--segment-lengths", "64,128", "--dilation-rates", "1,2"),
        *("--repeats", "2", "--linear-reference", "256", "--json", str(out), "--plot", str(png)),
    )
    result = json.loads(out.read_text())
    assert result["label"] == f"cpu ({torch.get_num_threads()} threads), float32, 8x64"
    assert result["stopped"] is None
    rows = result["rows"]
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
        # 4 FLOPs per pair and head_dim forward, 14 forward and backward, per second.
        for t, pairs in zip(times, (dilated, heads * causal_pairs(n)), strict=True):
            assert math.isclose(t["fwd_tflops"], 4 * 64 * pairs / t["fwd_s"] / 1e12)
            assert math.isclose(t["fwd_bwd_tflops"], 14 * 64 * pairs / t["fwd_bwd_s"] / 1e12)
    assert rows[0]["time_per_token_rel"] == 1.0 and rows[0]["peak_per_token_rel"] == 1.0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_attention_benchmark_stops_where_its_time_budget_ends(tmp_path):
    out = tmp_path / "attention.json"
    stdout = run_script(
        "attention.py",
        *("--seq-lens", "128,256", "--segment-lengths", "64", "--dilation-rates", "2"),
        *("--repeats", "1", "--total-budget", "0", "--json", str(out)),
    )
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["stopped"].startswith("time budget of 0 s")
    assert "stopped: time budget" in stdout


def attention_result(label, rows):
    """An attention.py JSON result: rows of (seq_len, {name: (fwd+bwd s, peak bytes)})."""
    config = {"device": "cpu", "dtype": "float32", "heads": 8, "head_dim": 64}
    return {
        "label": label,
        "config": config,
        "stopped": None,
        "rows": [
            {
                "seq_len": n,
                "ideal_ratio": 2.0,
                **{
                    name: {"fwd_bwd_s": s, "fwd_bwd_peak_bytes": peak, "fwd_bwd_tflops": 1.5}
                    for name, (s, peak) in cases.items()
                },
            }
            for n, cases in rows
        ],
    }


def test_plot_draws_time_per_token_and_peak_memory_per_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import plot_attention

    figures = []
    monkeypatch.setattr(plot_attention.plt, "close", figures.append)
    cpu = attention_result(
        "cpu",
        [(256, {"dilated": (0.5, 2**20), "dense": (1.0, 2**21)}), (512, {"dilated": (1.0, 2**21)})],
    )
    gpu = attention_result("gpu", [(1024, {"dilated": (0.001, 2**30), "dense": (0.004, 2**30)})])
    del gpu["label"]  # files written before runs had labels: named from their configuration
    paths = [tmp_path / "cpu.json", tmp_path / "gpu.json"]
    for path, result in zip(paths, (cpu, gpu), strict=True):
        path.write_text(json.dumps(result))
    plot_attention.plot(paths, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    time_axis, memory_axis = figures[0].axes
    assert time_axis.get_xscale() == time_axis.get_yscale() == memory_axis.get_yscale() == "log"
    lines = {line.get_label(): line for line in time_axis.get_lines()}
    assert sorted(lines) == sorted(
        ["dilated: cpu", "dense: cpu", "dilated: cpu, float32, 8x64", "dense: cpu, float32, 8x64"]
    )
    assert list(lines["dilated: cpu"].get_xdata()) == [256, 512]
    assert list(lines["dilated: cpu"].get_ydata()) == [0.5 / 256 * 1e6, 1.0 / 512 * 1e6]
    assert list(lines["dense: cpu"].get_xdata()) == [256]
    assert lines["dense: cpu"].get_linestyle() == "--"
    memory = {line.get_label(): list(line.get_ydata()) for line in memory_axis.get_lines()}
    assert memory["dilated: cpu"] == [1.0, 2.0] and memory["dense: cpu, float32, 8x64"] == [1024.0]


def test_lm_throughput_and_the_gpu_report(tmp_path):
    lm = tmp_path / "lm.json"
    stdout = run_script(
        "lm_throughput.py",
        *("--preset", "longnet-tiny", "--device", "cpu", "--dtype", "float32"),
        *("--seq-len", "128", "--max-seq-len", "256", "--steps", "1", "--json", str(lm)),
    )
    result = json.loads(lm.read_text())
    part1, part2 = result["throughput"], result["longest"]
    assert part1["dense"]["patterns"] == [[128], [1]]
    assert part1["dilated"]["patterns"] == [[64, 128, 256], [1, 2, 4]]
    for name in ("dilated", "dense"):
        assert part1[name]["tokens_per_s"] == 128 / part1[name]["step_s"]
        assert part1[name]["peak_bytes"] > 0
    assert part1["speedup"] == part1["dense"]["step_s"] / part1["dilated"]["step_s"]
    assert [row["seq_len"] for row in part2["rows"]] == [128, 256]
    assert part2["longest_seq_len"] == 256 and part2["stopped"] == "--max-seq-len 256 reached"
    assert "longest trained: 256 tokens" in stdout

    attention = tmp_path / "attention.json"
    attention.write_text(json.dumps(attention_result("cpu", [(256, {"dilated": (0.5, 2**30)})])))
    log = tmp_path / "tests.log"
    log.write_text("..s                       [100%]\n2 passed, 1 skipped in 3.20s\n")
    report = tmp_path / "report.json"
    stdout = run_script(
        "gpu_report.py",
        *("--tests-log", str(log), "--tests-status", "0", "--lm", str(lm), "--json", str(report)),
        *("--attention", str(attention), str(tmp_path / "killed.json")),
    )
    table = json.loads(report.read_text())["table"]
    assert table[0]["dilated"] == "2 passed, 1 skipped in 3.20s; exit status 0"
    assert table[1]["seq"] == "256" and table[1]["dense"] == "-"
    assert table[1]["dilated"] == "0.5000 s, 1.5 TFLOP/s, 1.00 GiB"
    assert table[2]["dilated"] == "missing: failed or out of time"
    lm_row = table[3]
    assert lm_row["seq"] == "128" and lm_row["dilated vs dense"] == f"{part1['speedup']:.2f}x"
    assert table[4]["seq"] == "256" and table[5]["dilated"] == "stopped: --max-seq-len 256 reached"
    assert "2 passed, 1 skipped" in stdout and "missing: failed or out of time" in stdout


def test_gpu_script_without_a_gpu_stops_at_once_with_status_2():
    before = sorted((ROOT / "benchmarks" / "results").glob("gpu-*"))
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "no CUDA GPU" in result.stderr and "nothing was run" in result.stderr
    assert result.stdout == ""  # nothing installed, nothing run
    assert sorted((ROOT / "benchmarks" / "results").glob("gpu-*")) == before


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


@pytest.mark.parametrize(
    "span, near, ranking_dims, span_max",
    [(1, False, 0, False), (5, True, 0, False), (3, False, 16, False), (5, False, 16, True)],
)
def test_passkey_attribution_masses_add_up_to_the_mixed_attention_on_the_keys(
    span, near, ranking_dims, span_max
):
    """benchmarks/passkey_attribution.py's per-pattern masses (dilated, chosen blocks, pooled
    blocks) sum to what the library's mixed attention puts on the key tokens: the output for
    values that are 1 on the keys (a whole block, so that its mean is 1 too) and 0 elsewhere."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from passkey_attribution import choice, pattern_masses
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from longnet import LongNetConfig, dilated_attention

    config = LongNetConfig.preset(
        "longnet-tiny", position="rotary", segment_lengths=(16, 32), dilation_rates=(1, 2),
        select_top_k=2, select_block_size=8, select_pooled=True, select_query_span=span,
        select_within_segment=near, select_ranking_dims=ranking_dims, select_span_max=span_max,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    n, heads, dim = 61, config.num_heads, config.head_dim
    q, k = (torch.randn(n, heads, dim, generator=generator, dtype=torch.float64) for _ in "qk")
    keys = list(range(8, 16))  # block 1
    v = torch.zeros(n, heads, 1, dtype=torch.float64)
    v[keys] = 1.0
    out = dilated_attention(
        q[None], k[None], v[None].expand(-1, -1, -1, dim), config.segment_lengths,
        config.dilation_rates, causal=True, softmax_scale=dim**-0.5,
        select_top_k=config.select_top_k, select_block_size=config.select_block_size,
        select_pooled=True, select_query_span=span, select_within_segment=near,
        select_ranking_dims=ranking_dims, select_span_max=span_max,
    )[0, :, :, 0]  # fmt: skip
    for query in (20, 40, 60):
        masses = pattern_masses(q[: query + 1], k[: query + 1], query, keys, config)
        assert masses.shape == (heads, 4)  # 16/1, 32/2, chosen, pooled
        assert torch.allclose(masses.sum(-1), out[query], atol=1e-12), query
        _, chosen = choice(q, k, query, config)
        assert torch.equal(chosen[:, keys].any(-1), masses[:, 2] > 0)
    assert (masses[:, 3] > 0).all()
