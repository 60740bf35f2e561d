"""The demo keeps its results.json (``--save-json``) and the docs' demo tables render from it
(``salience.demos.markdown``, used by ``benchmarks/docs_tables.py``)."""

import io
import json
import sys

from salience.demos import markdown as md


def _tiny_run(tmp_path, keep):
    from salience.cli import main

    buf, old = io.StringIO(), sys.stdout
    sys.stdout = buf
    try:
        rc = main(["demo", "--out", str(tmp_path / "out"), "--steps", "2", "--min-len", "3", "--max-len", "6",
                   "--buckets", "2", "--per-bucket", "4", "--hidden", "8", "--eff-min-len", "16", "--eff-max-len",
                   "32", "--methods", "full,linear", "--save-json", str(keep)])
    finally:
        sys.stdout = old
    return rc


def test_save_json_keeps_results_with_the_machine_and_tables_render_from_it(tmp_path):
    keep = tmp_path / "kept" / "demo.json"
    assert _tiny_run(tmp_path, keep) == 0
    assert keep.read_text() == (tmp_path / "out" / "results.json").read_text()
    data = json.loads(keep.read_text())
    m = data["machine"]
    assert m["cpus"] >= 1 and m["torch"] and m["wall_seconds"] > 0 and len(m["loadavg_end"]) == 3
    assert data["command"].startswith("salience demo --out")
    acc = data["accuracy"]["metrics"]
    tok = md.accuracy(data, "token_accuracy").splitlines()
    assert tok[0] == "| model \\ length | 3-4 | 5-6 |" and len(tok) == 2 + len(acc)
    for line, (k, ms) in zip(tok[2:], acc.items()):
        assert line == f"| {md.LABELS[k]} | " + " | ".join(f"{100 * x['token_accuracy']:.1f}" for x in ms) + " |"
    quick = md.accuracy_quick(data).splitlines()
    assert quick[2].startswith("| no attention | ") and " / " in quick[2]
    al = md.alignment(data)
    assert "additive: aligned token" in al and "uniform (chance)" in al and "no attention" not in al
    eff = md.efficiency(data)
    assert "| 16 |" in eff and "| 32 |" in eff and "**time slope**" in eff and "**memory slope**" in eff


def test_efficiency_cells_slopes_and_stops_hand_case():
    pts = [{"method": "full", "length": n, "seconds": s, "peak_bytes": b}
           for n, s, b in ((512, 0.002, 1 << 19), (1024, 0.008, 2 << 20), (2048, 0.032, 3 << 30))]
    pts.append({"method": "linear", "length": 512, "seconds": 1.5, "peak_bytes": 12 << 20})
    data = {"efficiency": {
        "points": pts,
        "stopped": {"full": "next length N=4096 predicted at 30.3 s per call > time limit 30 s",
                    "linear": "out of memory at N=1024"},
        "slope_fit": {"time": {"full": {"slope": 2.0, "readable": True}, "linear": {"slope": None}},
                      "memory": {"full": {"slope": 1.2, "readable": False, "reason": "R^2=0.5"}}}}}
    t = md.efficiency_time(data).splitlines()
    assert t[2] == "| N | full | linear |"
    assert t[4] == "| 512 | 2.0 ms | 1.50 s |" and t[6] == "| 2,048 | 32.0 ms |  |"
    assert t[7] == "| 4,096 | stopped: 30.3 s predicted |  |"  # the next length, with the predicted time
    assert t[8] == "| **time slope** | **2.00** |  |"
    m = md.efficiency_memory(data)
    assert "| 512 | <1 MiB | 12 MiB |" in m and "| 1,024 | 2.0 MiB |  |" in m and "| 2,048 | 3.0 GiB |  |" in m
    assert "| **memory slope** | n/r |  |" in m and "full memory: slope not readable (R^2=0.5)." in m
