"""salience.interpret.render: matplotlib figures in three formats, the self-contained HTML report, and the
report in headless Chromium (loads without console errors, every handler runs, the screenshot is not blank).

The Chromium tests need Debian's ``chromium`` package (``apt-get install -y chromium``); without it they are
skipped with a message saying so.
"""

import re
import shutil
import subprocess

import pytest
import torch

from salience.interpret import AttentionMaps
from salience.interpret import methods as M
from salience.interpret.render import html, png


def maps(n=2, H=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, H, L, L, generator=g) * 2, -1)


# --------------------------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_figures_in_every_format(tmp_path, suffix):
    a = maps()
    toks = [f"w{i}" for i in range(7)]
    figs = {
        "head": png.head_heatmap(a[0, 0], tokens=toks, title="L0 h0"),
        "grid": png.layer_head_grid(a, title="grid"),
        "bars": png.importance_bars({"rollout": M.token_importance(M.rollout(a), "mean"), "x": torch.rand(7)}, toks),
        "entropy": png.head_matrix(M.entropy(a), title="entropy"),
    }
    for name, fig in figs.items():
        path = png.save(fig, tmp_path / f"{name}{suffix}")
        assert path.stat().st_size > 1000
    if suffix == ".png":
        import matplotlib.image

        img = matplotlib.image.imread(tmp_path / "head.png")
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_long_inputs_are_pooled_in_figures():
    a = torch.softmax(torch.randn(1, 1, 600, 600), -1)
    pooled, block = png.pool_map(a, 256)
    assert block == 3 and pooled.shape == (1, 1, 200, 200)
    assert torch.allclose(pooled.sum(-1), torch.ones(1, 1, 200), atol=1e-5)  # rows keep their mass
    fig = png.head_heatmap(a[0, 0], tokens=[str(i) for i in range(600)])
    assert fig.axes[0].images[0].get_array().shape == (200, 200)
    fig = png.importance_bars(torch.rand(1000), [str(i) for i in range(1000)], max_bars=100)
    assert len(fig.axes[0].patches) == 100


def test_figure_errors(tmp_path):
    with pytest.raises(ValueError, match="must end in one of"):
        png.save(png.head_matrix(torch.rand(2, 2)), tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="2-D map"):
        png.head_heatmap(torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match=r"\(layers, H, L, S\)"):
        png.layer_head_grid(torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="has 3 tokens"):
        png.importance_bars({"a": torch.rand(4), "b": torch.rand(3)})
    with pytest.raises(ValueError, match="values is empty"):
        png.importance_bars({})


# -------------------------------------------------------------------------------------------- HTML


def test_html_is_self_contained():
    a = maps()
    page = html.report(a, [f"<w{i}>" for i in range(7)], importances={"rollout": M.token_importance(M.rollout(a), 0)})
    assert isinstance(page, str) and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", page)  # no CDN, no network
    assert not re.search(r"<(script|img|iframe)[^>]+src=|<link", page)
    assert "<w0>" not in page.replace("\\u003c", "<").split('id="salience-data">')[0]  # tokens live in JSON only
    data = html.payload(a, [f"w{i}" for i in range(7)])
    assert data["maps"]["block"] == 1 and data["maps"]["rows"] == 7
    assert len(data["entropy"]) == 2 and len(data["entropy"][0]) == 3


def test_html_payload_pools_long_inputs_and_accepts_captured_maps():
    a = torch.softmax(torch.randn(1, 2, 500, 500), -1)
    data = html.payload(a, [str(i) for i in range(500)], detail=100)
    assert data["maps"]["block"] == 5 and data["maps"]["rows"] == 100 and data["maps"]["cols"] == 100
    m = AttentionMaps(tokens=["a", "b", "c"], maps=[torch.full((1, 2, 1, 3), 1 / 3)],
                      metadata={"entries": [{"name": "enc.0", "layer": 0, "call": 0, "rows": [2], "pool": 1}]})
    data = html.payload(m)
    assert data["row_index"] == [2] and data["layer_names"] == ["enc.0"] and data["tokens"] == ["a", "b", "c"]


def test_html_errors():
    a = maps()
    with pytest.raises(ValueError, match="tokens has 3 entries but the maps have S=7"):
        html.report(a, ["a", "b", "c"])
    with pytest.raises(ValueError, match="pass row_index"):
        html.report(a[:, :, :2], [str(i) for i in range(7)])
    with pytest.raises(ValueError, match="importances\\['x'\\] has 2 values"):
        html.report(a, None, importances={"x": [1.0, 2.0]})
    with pytest.raises(ValueError, match="detail must be an int >= 8"):
        html.report(a, None, detail=2)


# ----------------------------------------------------------------------------------- headless Chromium


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium); the HTML report was "
                "not checked in a browser")


def _browse(tmp_path, page, *args, budget=8000):
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--virtual-time-budget={budget}",
           "--enable-logging=stderr", "--v=0", *args, page]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("L", [12, 2048])
def test_report_in_headless_chromium(tmp_path, L):
    n, H = (6, 12) if L < 100 else (2, 4)
    a = torch.softmax(torch.randn(n, H, L, L) * 3, -1)
    toks = [f"tok{i}" for i in range(L)]
    imps = {"received": a.mean((0, 1, 2)), "last row": a[-1, 0, -1]}
    if L < 100:
        imps["rollout"] = M.token_importance(M.rollout(a), "mean")
    path = html.report(a, toks, tmp_path / "report.html", importances=imps)
    dom = _browse(tmp_path, path.as_uri() + "#selftest", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console  # no console message at all (errors, warnings, logs)
    assert 'data-ready="1"' in dom.stdout and not re.search(r"<html[^>]*data-errors", dom.stdout)
    assert 'data-selftest="ok' in dom.stdout, re.findall(r'data-selftest="[^"]*"', dom.stdout)
    shot = tmp_path / "shot.png"
    res = _browse(tmp_path, path.as_uri(), f"--screenshot={shot}", "--window-size=1280,1400")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    assert img.std() > 0.1  # not blank
    assert len({tuple(p) for p in (img[::7, ::7].reshape(-1, 3) * 255).astype(int).tolist()}) > 50


def test_chromium_reports_a_broken_page(tmp_path):
    """The checks above would see an error: a page with a failing handler is reported as such."""
    page = html.report(maps(), None).replace("drawAll(); drawBars();", "drawAll(); missingFunction(); drawBars();")
    path = tmp_path / "broken.html"
    path.write_text(page)
    dom = _browse(tmp_path, path.as_uri(), "--dump-dom")
    assert re.search(r'<html[^>]*data-errors="1"', dom.stdout) and 'data-ready="1"' not in dom.stdout
    assert any("missingFunction" in ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln)
