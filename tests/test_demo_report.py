"""salience demo's report: the interactive page names models and axes, the slope-readability rule, the
efficiency figure's legend, and Performer's linear peak memory."""

import json
import re

import pytest
import torch

from salience.demos import report
from salience.demos.efficiency import (
    SLOPE_MIN_R2,
    PeakRSS,
    Point,
    SweepResult,
    _malloc_trim,
    _mmap_threshold,
    slope_fit,
)
from salience.demos.seq2seq import LABELS, TrainConfig, compare
from salience.demos.task import Transliteration
from salience.layers import PerformerAttention

# ------------------------------------------------------------------------------------ attention.html


@pytest.fixture(scope="module")
def tiny():
    task = Transliteration(vocab=5, min_len=3, max_len=6)
    c = compare(task, TrainConfig(steps=2, hidden_dim=8, embed_dim=4), buckets=[(3, 4), (5, 6)], per_bucket=4)
    return task, c


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="salience-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_attention_page_names_models_and_axes(tiny, tmp_path):
    task, c = tiny
    page = report.write_interactive(c, task, tmp_path).read_text()
    d = _data(page)
    kinds = [k for k, e in c.examples.items() if e["weights"] is not None]
    # each model is named (short names fit the grid's label width) and its full name is on the page
    assert d["layer_names"] == [report.SHORT_LABELS[k] for k in kinds]
    assert all(len(n) < 12 for n in d["layer_names"])
    for k in kinds:
        assert LABELS[k] in d["summary"]
    assert "target" in d["summary"] and "source" in d["summary"]
    # rows (queries) are the decoder's target tokens, columns (keys) the source tokens
    e = c.examples[kinds[0]]
    T, S = e["weights"].shape
    src = task.source_symbols(e["src"])
    tgt = task.target_symbols(e["pred"])
    assert d["maps"]["R"] == T and d["maps"]["S"] == S
    assert [d["tokens"][i] for i in range(S)] == [f"{t} (s{i})" for i, t in enumerate(src)]
    assert [d["tokens"][r] for r in d["row_index"]] == [f"{t} (t{i})" for i, t in enumerate(tgt[:T])]


def test_attention_page_hides_empty_sections(tiny, tmp_path):
    task, c = tiny
    page = report.write_interactive(c, task, tmp_path).read_text()
    d = _data(page)
    assert not d.get("importances") and not d.get("faithfulness")
    for sid in ("bars-sec", "faith-sec"):  # no data: hidden, not an empty header
        assert re.search(rf'<section id="{sid}"[^>]*\bhidden\b', page), sid
    assert '<section id="model">' in page and '<section id="views">' in page  # the maps stay


def test_attention_page_none_without_attention(tmp_path):
    task = Transliteration(vocab=5, min_len=2, max_len=4)
    c = compare(task, TrainConfig(steps=1, hidden_dim=8, embed_dim=4), kinds=("none",), buckets=[(2, 4)],
                per_bucket=2)
    assert report.write_interactive(c, task, tmp_path) is None


# ------------------------------------------------------------------------------------ slope readability


def test_slope_rule_on_synthetic_points():
    xs = (512, 1024, 2048, 4096)
    clean = slope_fit([(x, 3e-9 * x**2) for x in xs])
    assert clean.readable and clean.slope == pytest.approx(2.0) and clean.r2 == pytest.approx(1.0)
    assert clean.label() == "2.00"
    # a mild wobble stays readable
    assert slope_fit([(x, x * f) for x, f in zip(xs, (1.0, 1.1, 0.95, 1.05))]).readable
    # too few points
    few = slope_fit([(512, 1.0), (1024, 2.0)])
    assert not few.readable and few.label() == "not readable (2 points)"
    assert slope_fit([]).label() == "not readable (0 points)"
    # noisy: a low R^2 is named in the label
    noisy = slope_fit([(512, 1.0), (1024, 1.1), (2048, 9.0), (4096, 10.0)])
    assert not noisy.readable and noisy.r2 < SLOPE_MIN_R2 and noisy.label().startswith("not readable (R^2=0.")
    # high R^2 but one doubling step far off the fit (a jump at the end): not readable either
    kink = slope_fit([(512, 1.0), (1024, 4.0), (2048, 16.0), (4096, 128.0)])  # steps 2, 2, 3
    assert kink.r2 >= SLOPE_MIN_R2 and not kink.readable and "doubling step 3.00" in kink.reason


def _result(points):
    cfg = {"batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32", "window": 256, "features": 256,
           "threads": 1}
    return SweepResult([Point(*p) for p in points], cfg, {"performer": "reached max_len=4096"})


def test_efficiency_table_and_json_say_not_readable():
    xs = (512, 1024, 2048, 4096)
    r = _result([("textbook", x, 1e-9 * x**2, x * x * 64) for x in xs]
                + [("performer", x, s, b) for x, s, b in zip(xs, (0.006, 0.027, 0.06, 0.118),
                                                             (90e3, 11.9e6, 40e6, 80e6))])
    text = report.efficiency_table(r)
    slope_row = [ln for ln in text.splitlines() if ln.startswith("slope")][0].split()
    assert slope_row[1] == "2.00" and "n/r" in slope_row
    assert "performer mem: slope not readable" in text or "performer time: slope not readable" in text
    d = r.to_dict()
    assert d["slope_fit"]["time"]["textbook"]["readable"] is True
    assert d["slope_fit"]["memory"]["textbook"]["slope"] == pytest.approx(2.0)


def test_efficiency_figure_puts_the_legend_outside_the_axes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    xs = (512, 1024, 2048, 4096)
    r = _result([("textbook", x, 1e-9 * x**2, x * x * 64) for x in xs]
                + [("performer", x, 1e-6 * x * f, 4096 * x * f) for x, f in zip(xs, (1.0, 3.0, 1.0, 3.0))])
    seen = {}
    from matplotlib.figure import Figure

    real = Figure.savefig

    def spy(fig, *a, **k):
        fig.canvas.draw()
        seen["legends"] = [(ax.get_legend(), ax) for ax in fig.axes if ax.get_legend() is not None]
        seen["labels"] = [t.get_text() for lg, _ in seen["legends"] for t in lg.get_texts()]
        return real(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    path = report.plot_efficiency(r, tmp_path / "e.png")
    assert path.stat().st_size > 1000
    assert len(seen["legends"]) == 2
    for lg, ax in seen["legends"]:  # no overlap between a legend and its axes' plotting area
        lb, ab = lg.get_window_extent(), ax.get_window_extent()
        assert lb.y1 <= ab.y0 or lb.x0 >= ab.x1, (lb, ab)
    assert any("slope 2.00" in t for t in seen["labels"])
    assert any("slope not readable (R^2=" in t for t in seen["labels"])


# ------------------------------------------------------------------------------------ Performer memory


def _peak(core, n, reps=3):
    q = torch.randn(1, 4, n, 64)
    peaks = []
    for _ in range(reps):
        _malloc_trim()
        _mmap_threshold(64 << 10)
        try:
            with torch.no_grad(), PeakRSS() as m:
                out = core(q, q, q)
            del out
        finally:
            _mmap_threshold(32 << 20)
        if m.peak is None:
            pytest.skip("no /proc: resident set not readable")
        peaks.append(m.peak)
    return sorted(peaks)[len(peaks) // 2]


def test_performer_peak_memory_is_linear_in_length():
    """Peak resident growth of one forward at L and 4L: linear (ratio ~4, far from 16), and a few (L, m)
    matrices, not an (L, L) one. No timing involved."""
    core = PerformerAttention(64, num_features=256, seed=0)
    core(torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64))  # warm up
    small, large = _peak(core, 1024), _peak(core, 4096)
    lm = 4 * 4096 * 256 * 4  # bytes of one (B*H, L, m) float32 matrix at L=4096
    assert large < 5 * lm, (large, lm)  # a few feature matrices; an (L, L) map per head alone is 16 lm
    assert small > 0.5 * lm / 4
    assert 2.5 < large / small < 6.0, (small, large)


def test_performer_features_allocate_no_quadratic_intermediate():
    """Every tensor the non-causal forward creates is at most (B, H, L, m): none grows like L^2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Biggest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Biggest.numel = max(Biggest.numel, t.numel())
            return out

    L, m = 512, 32
    core = PerformerAttention(16, num_features=m, seed=0)
    q = torch.randn(1, 2, L, 16)
    with Biggest():
        core(q, q, q)
    assert Biggest.numel <= 2 * L * m  # (B, H, L, m); an (L, L) map would be 2 * L * L = 16x more


def test_attention_page_runs_in_headless_chromium(tiny, tmp_path):
    """The relabelled page still passes the renderer's own #selftest, with no script error."""
    import shutil
    import subprocess

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")
    task, c = tiny
    path = report.write_interactive(c, task, tmp_path)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=8000", "--dump-dom", path.as_uri() + "#selftest"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout and not re.search(r"<html[^>]*data-errors", dom.stdout)
    assert 'data-selftest="ok' in dom.stdout, re.findall(r'data-selftest="[^"]*"', dom.stdout)
