"""The report's views people read: token labels on both axes of the matrix view and its colour scale, the
importance bars' y axis, repeated tokens told apart by position (HTML and PNG), readable PNG tick labels,
grid.png's colour bar, Jupyter display (``_repr_html_``) and the optional wordpiece merge.

The browser checks need headless Chromium (Debian: ``apt-get install -y chromium``) and are skipped without it.
"""

import html as _html
import re
import shutil
import subprocess

import pytest
import torch

from salience.interpret import AttentionMaps
from salience.interpret import methods as M
from salience.interpret.render import html, png
from salience.interpret.words import merge_importance, merge_maps, merge_wordpieces, word_groups

TOKS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]


def maps(n=2, H=2, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, H, L, L, generator=g) * 2, -1)


# ------------------------------------------------------------------------------------ repeated tokens


def test_repeated_tokens_carry_their_position():
    assert png.token_labels(TOKS) == ["[CLS]", "the·1", "cat", "sat", "on", "the·5", "mat", "[SEP]"]
    assert png.token_labels(["a", "b"]) == ["a", "b"]
    data = html.payload(maps(), TOKS)
    assert data["tokens"] == TOKS and data["labels"][1] == "the·1" and data["labels"][5] == "the·5"


def test_png_tick_labels_disambiguated_and_sized():
    fig = png.head_heatmap(maps()[0, 0], tokens=TOKS)
    ax = fig.axes[0]
    xl = [t.get_text() for t in ax.get_xticklabels()]
    yl = [t.get_text() for t in ax.get_yticklabels()]
    assert xl == yl and "the·1" in xl and "the·5" in xl and len(xl) == 8
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    bars = png.importance_bars(torch.rand(8), TOKS)
    assert "the·5" in [t.get_text() for t in bars.axes[0].get_xticklabels()]
    # 128 tokens: every label gets at least its font's height of room at 100 % (1 pt = 1/72 in)
    a = torch.softmax(torch.randn(128, 128), -1)
    fig = png.head_heatmap(a, tokens=[f"t{i}" for i in range(128)])
    ax = fig.axes[0]
    labs = ax.get_yticklabels()
    fs = labs[0].get_fontsize()
    height_pt = ax.get_position().height * fig.get_size_inches()[1] * 72
    assert fs >= 7 and height_pt / len(labs) >= 1.2 * fs, (fs, height_pt, len(labs))


def test_grid_png_has_a_colour_bar(tmp_path):
    fig = png.layer_head_grid(maps(3, 4), title="grid")
    assert len(fig.axes) == 2  # the mosaic and its colour bar
    assert "maximum" in fig.axes[1].get_ylabel()
    assert png.save(fig, tmp_path / "grid.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------- Jupyter


def test_repr_html_is_the_same_self_contained_page():
    a = maps()
    page = html.report(a, TOKS)
    assert isinstance(page, str) and isinstance(page, html.ReportHTML)
    frag = page._repr_html_()
    m = re.fullmatch(r'<iframe srcdoc="([^"]*)"[^>]*></iframe>', frag, flags=re.S)
    assert m and _html.unescape(m.group(1)) == page
    assert not re.search(r"https?://", frag)
    captured = AttentionMaps(tokens=TOKS, maps=[a[i:i + 1] for i in range(2)],
                             metadata={"entries": [{"name": f"l{i}", "layer": i, "call": 0, "rows": list(range(8)),
                                                    "pool": 1} for i in range(2)]})
    frag2 = captured._repr_html_()
    assert frag2.startswith("<iframe srcdoc=") and r"the\u00b75" in _html.unescape(frag2)  # JSON-escaped "the·5"


# ---------------------------------------------------------------------------------- wordpiece merge


def test_wordpiece_merge_hand_case():
    toks = ["[CLS]", "play", "##ing", "ball", "[SEP]"]
    words, groups = word_groups(toks)
    assert words == ["[CLS]", "playing", "ball", "[SEP]"] and groups == [[0], [1, 2], [3], [4]]
    a = torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.1],
                      [0.0, 0.6, 0.2, 0.2, 0.0],
                      [0.2, 0.2, 0.2, 0.2, 0.2],
                      [0.1, 0.1, 0.1, 0.1, 0.6],
                      [0.3, 0.3, 0.0, 0.0, 0.4]], dtype=torch.float64)
    want = torch.tensor([[0.5, 0.2, 0.2, 0.1],          # keys "play" + "##ing" summed: 0.1 + 0.1
                         [0.1, 0.6, 0.2, 0.1],          # row of "playing": mean of rows 1 and 2
                         [0.1, 0.2, 0.1, 0.6],
                         [0.3, 0.3, 0.0, 0.4]], dtype=torch.float64)
    got = merge_maps(a[None, None], groups)[0, 0]
    assert torch.allclose(got, want)
    assert torch.allclose(got.sum(-1), torch.ones(4, dtype=torch.float64))  # still attention
    assert merge_importance([1.0, 2.0, 3.0, 4.0, 5.0], groups).tolist() == [1.0, 5.0, 4.0, 5.0]
    w, m, imps = merge_wordpieces(toks, a[None, None], {"x": torch.arange(5.0)})
    assert w == words and m.shape == (1, 1, 4, 4) and imps["x"].tolist() == [0.0, 3.0, 3.0, 4.0]
    data = html.payload(a[None, None].float(), toks, importances={"x": torch.arange(5.0)}, merge_wordpieces=True)
    assert data["tokens"] == words and data["maps"]["rows"] == 4 and data["importances"]["x"] == [0.0, 3.0, 3.0, 4.0]
    assert "5 tokens merged into 4 words" in data["summary"]
    with pytest.raises(ValueError, match="every query row"):
        html.payload(a[None, None, 1:].float(), toks, row_index=[1, 2, 3, 4], merge_wordpieces=True)


# ------------------------------------------------------------------------------- headless Chromium


def _browse(tmp_path, page, *args):
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=6000", *args, page]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _attr(dom, el_id, name):
    m = re.search(r'<canvas[^>]*id="' + el_id + r'"[^>]*>', dom)
    assert m, el_id
    v = re.search(name + r'="([^"]*)"', m.group(0))
    return _html.unescape(v.group(1)) if v else None


def test_matrix_labels_legend_and_bar_axis_in_chromium(tmp_path):
    a = maps()
    imps = {"rollout": M.token_importance(M.rollout(a), "mean")}
    path = html.report(a, TOKS, tmp_path / "r.html", importances=imps)
    dom = _browse(tmp_path, path.as_uri(), "--dump-dom")
    assert dom.returncode == 0 and 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]
    xs, ys = _attr(dom.stdout, "mx", "data-xlabels").split("|"), _attr(dom.stdout, "mx", "data-ylabels").split("|")
    assert xs == ys == png.token_labels(TOKS)  # every token on both axes, the two "the" told apart
    legend = [float(x) for x in _attr(dom.stdout, "mx", "data-legend").split("|")]
    assert legend[0] == 0 and legend == sorted(legend) and 0 < legend[-1] <= 1 and len(legend) == 5
    yt = [float(x) for x in _attr(dom.stdout, "bars", "data-yticks").split("|")]
    assert len(yt) == 5 and yt[0] == 0 and yt[-1] == pytest.approx(float(imps["rollout"].abs().max()), rel=0.02)


def test_long_input_labels_every_nth_in_chromium(tmp_path):
    L = 300
    a = torch.softmax(torch.randn(1, 1, L, L), -1)
    path = html.report(a, [f"t{i % 7}" for i in range(L)], tmp_path / "r.html", detail=300)
    dom = _browse(tmp_path, path.as_uri(), "--dump-dom")
    xs = _attr(dom.stdout, "mx", "data-xlabels").split("|")
    assert 10 <= len(xs) < L and xs[0] == "t0·0" and all("·" in x for x in xs)


def test_explain_words_merges_wordpieces_in_the_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    import json

    from salience import cli

    out = tmp_path / "r"
    assert cli.main(["explain", "Tokenization is unbelievably hard.", "--words", "--method", "rollout,entropy",
                     "--no-png", "--quiet", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    data = json.loads(re.search(r'id="salience-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    assert "tokenization" in data["tokens"] and "unbelievably" in data["tokens"]
    assert not any(t.startswith("##") for t in data["tokens"]) and "merged into" in data["summary"]
    assert len(data["importances"]["rollout"]) == len(data["tokens"]) == data["maps"]["S"]


def test_head_view_overlays_all_heads_in_chromium(tmp_path):
    """The self test ticks "all heads in colour", hides head 0 with its chip, and checks the heads drawn."""
    path = html.report(maps(2, 4), TOKS, tmp_path / "r.html")
    assert 'id="hv-all"' in path.read_text()
    dom = _browse(tmp_path, path.as_uri() + "#selftest", "--dump-dom")
    assert 'data-selftest="ok' in dom.stdout and "overlay=true" in dom.stdout, re.findall(r'data-selftest="[^"]*"', dom.stdout)
