"""``salience bench``: configurations, FLOP accounting, the workers, the table, the CLI (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from salience import bench, cli


def test_useful_flops_count_visible_pairs():
    n, D, H = 64, 16, 2
    full = bench.Config("x", "none", N=n, D=D, H=H)
    causal = bench.Config("x", "causal", N=n, D=D, H=H)
    window = bench.Config("x", "window", N=n, D=D, H=H, window=8)
    assert bench.useful_flops(full) == 4 * D * H * n * n
    assert bench.useful_flops(causal) == 4 * D * H * n * (n + 1) // 2
    visible = sum(min(i, 8) + 1 for i in range(n))
    assert bench.useful_flops(window) == 4 * D * H * visible
    fb = bench.Config("x", "causal", N=n, D=D, H=H, mode="fwdbwd")
    assert bench.useful_flops(fb) == pytest.approx(3.5 * bench.useful_flops(causal))


def test_documents_have_unequal_lengths_and_cover_the_sequence():
    cfg = bench.Config("d", "documents", N=160, H=1, D=4)
    _, _, _, mask, _, ids = bench._build(cfg)
    counts = torch.bincount(ids).tolist()
    assert len(counts) == 4 and sum(counts) == 160 and len(set(counts)) == 4


def test_grids_cover_the_issue_targets():
    names = {c.name for c in bench.GRID}
    for want in ("nomask_f32", "nomask_bf16", "causal_f32", "causal_bf16", "window_f32", "window_bf16",
                 "documents_f32", "documents_bf16", "alibi_causal_f32", "softcap_causal_f32", "window_fwdbwd_f32"):
        assert want in names
    for want in ("lambda_window_f32", "checkerboard_f32", "bias_f32", "bias_fwdbwd_f32", "compiled_window_f32"):
        assert want in names  # kernels v2 (issue 15): callables, bias tensors, a compiled model
    v2 = {"lambda_window", "checkerboard"}
    assert all(c.N == 16384 and c.H == 8 and c.D == 64 for c in bench.GRID
               if c.mask not in v2 and c.mod != "bias" and c.mode != "compiled")
    assert {c.N for c in bench.GRID if c.mask in v2 or c.mode == "compiled"} == {8192}
    assert {c.N for c in bench.GRID if c.mod == "bias"} == {2048}
    m = bench.million_config()
    assert (m.N, m.H, m.D, m.mask, m.window) == (1 << 20, 4, 64, "window", 256)
    assert len(bench.QUICK_GRID) < len(bench.GRID) and all(c.N == 2048 for c in bench.QUICK_GRID)


@pytest.mark.parametrize("cfg", [
    bench.Config("w", "window", N=256, H=2, D=16, window=32, repeats=2, peers=("sdpa", "reference")),
    bench.Config("a", "causal", "alibi", N=192, H=2, D=16, repeats=1, peers=("sdpa", "reference")),
    bench.Config("s", "causal", "softcap", N=128, H=2, D=16, repeats=1, mode="fwdbwd", peers=("sdpa", "reference")),
    bench.Config("l", "lambda_window", N=256, H=2, D=16, window=32, repeats=1, peers=("sdpa", "reference")),
    bench.Config("c", "checkerboard", N=256, H=2, D=16, repeats=1, peers=("sdpa", "reference")),
    bench.Config("b", "none", "bias", N=192, H=2, D=16, repeats=1, mode="fwdbwd", peers=("sdpa", "reference")),
], ids=["window", "alibi", "softcap_fwdbwd", "lambda_window", "checkerboard", "bias_fwdbwd"])
def test_timing_worker_reports_every_implementation(cfg):
    res = bench._worker_time(cfg, flex=False)
    impls = res["impls"]
    assert "salience" in impls and "reference" in impls
    for name, e in impls.items():
        if "median_ms" not in e:
            continue
        assert e["median_ms"] > 0 and e["gflops_useful"] > 0
        assert e["max_err"] < 1e-4, (name, e)
    assert impls["salience"]["speedup_vs_salience"] == 1.0
    if cfg.mod == "softcap":
        assert "median_ms" not in impls.get("sdpa", {})  # SDPA cannot apply a softcap
    if cfg.mode == "fwdbwd":  # salience's forward is timed in the same run: the one-run ratio
        ratio = impls["salience"]["median_ms"] / impls["salience forward"]["median_ms"]
        assert res["fwdbwd_over_forward"] == pytest.approx(ratio)
        assert f"{ratio:.2f} x its forward" in impls["salience"]["note"]
    assert "backend" in res["plan"]


def test_memory_worker_in_process():
    cfg = bench.Config("w", "window", N=512, H=1, D=16, window=32, mode="fwdbwd")
    m = bench._worker_memory(cfg, "salience", flex=False)
    # Linux caches RSS counters per thread (up to 64 pages each, synced lazily), so a call that allocates little
    # can read a few hundred KiB below its start in a long-lived process (seen: -148 KiB in one CI run)
    assert m["impl"] == "salience" and m["peak_kib"] >= -1024 and m["qkvo_kib"] == 512 * 16 * 4 * 4 // 1024
    assert m["with_setup_kib"] == m["peak_kib"] + m["setup_kib"]


def test_memory_worker_counts_sdpa_mask_as_setup():
    # a fresh process: SDPA's set-up keeps its dense 2048 x 2048 boolean mask (4 MiB) resident
    cfg = bench.Config("w", "window", N=2048, H=1, D=16, window=32, mode="fwdbwd", peers=("sdpa",))
    s = bench._spawn(["--worker", "memory", "--impl", "sdpa", "--config", json.dumps(asdict(cfg))], 300)
    assert 3.5 * 1024 <= s["setup_kib"] <= 8 * 1024, s
    assert s["with_setup_kib"] == s["peak_kib"] + s["setup_kib"]


def test_table_and_plot(tmp_path):
    cfg = bench.Config("w", "window", N=128, H=1, D=8, window=16, repeats=1, peers=("sdpa",))
    res = bench._worker_time(cfg, flex=False)
    res["impls"]["sdpa"]["peak_mib"] = 1.5
    table = bench.format_table([res, {"label": "broken", "error": "boom"}])
    lines = table.splitlines()
    assert lines[0].startswith("| config | impl | median ms")
    assert any("| sdpa |" in ln and "1.5" in ln for ln in lines)
    assert any("broken" in ln and "error" in ln for ln in lines)
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    bench._plot([res], str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_selection_and_model_message(monkeypatch, capsys):
    p = cli.build_parser()
    args = p.parse_args(["bench", "--quick", "--only", "window", "--dtype", "bf16", "--n", "512"])
    sel = bench._select(args)
    assert sel and all("window" in c.name and c.dtype == "bf16" and c.N == 512 for c in sel)
    args = p.parse_args(["bench", "--only", "no-such-config"])
    assert bench.run(args) == 2
    monkeypatch.setitem(sys.modules, "salience.integrations.hf_bench", None)  # make the import fail
    args = p.parse_args(["bench", "--model", "minilm"])
    assert bench.run(args) == 2
    assert "hf_bench" in capsys.readouterr().err


def test_end_to_end_command_writes_json(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "salience.cli", "bench", "--quick", "--only", "window_f32", "--n", "256",
           "--repeats", "1", "--no-memory", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| window256 N=256 f32 | salience |" in res.stdout
    data = json.loads(out.read_text())
    assert data["results"][0]["impls"]["salience"]["median_ms"] > 0
    assert data["meta"]["command"].startswith("salience bench")
