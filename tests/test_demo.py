"""salience demo: the task, the seq2seq models, the metrics, the efficiency sweep, the report and the CLI."""

import argparse
import io
import json
import sys

import pytest
import torch

from salience.demos import efficiency, report
from salience.demos.cli import PRESETS, add_arguments, run, settings
from salience.demos.efficiency import PeakRSS, fit_slope, sweep
from salience.demos.seq2seq import (
    KINDS,
    Seq2Seq,
    TrainConfig,
    compare,
    evaluate,
    offset_mass,
    train,
)
from salience.demos.task import BOS, FIRST_SYMBOL, Transliteration, buckets_for

# ------------------------------------------------------------------------------------------------ task


@pytest.mark.parametrize("order", ["monotone", "reverse"])
def test_task_targets_follow_the_alignment(order):
    task = Transliteration(vocab=7, min_len=3, max_len=9, order=order, seed=3)
    b = task.sample(5, 9, torch.Generator().manual_seed(1))
    assert b.src.shape == b.tgt.shape == (5, 9)
    assert int(b.src.min()) >= FIRST_SYMBOL and int(b.src.max()) < task.num_tokens
    # target t is the table entry of the aligned source token
    assert torch.equal(b.tgt, task.table[b.src[:, b.aligned]])
    assert b.decoder_input[:, 0].eq(BOS).all() and torch.equal(b.decoder_input[:, 1:], b.tgt[:, :-1])
    # the table is one-to-one on the symbols
    assert sorted(task.table[FIRST_SYMBOL:].tolist()) == list(range(FIRST_SYMBOL, task.num_tokens))


def test_task_is_seeded():
    a = Transliteration(vocab=9, seed=1).sample(3, 6, torch.Generator().manual_seed(5))
    b = Transliteration(vocab=9, seed=1).sample(3, 6, torch.Generator().manual_seed(5))
    assert torch.equal(a.src, b.src) and torch.equal(a.tgt, b.tgt)
    assert not torch.equal(Transliteration(vocab=9, seed=1).table, Transliteration(vocab=9, seed=2).table)


def test_buckets_cover_the_range_without_gaps():
    for lo, hi, n in [(5, 60, 6), (5, 40, 4), (1, 3, 3), (7, 7, 1)]:
        bk = buckets_for(lo, hi, n)
        assert len(bk) == n and bk[0][0] == lo and bk[-1][1] == hi
        assert all(b[0] <= b[1] for b in bk) and all(bk[i][1] + 1 == bk[i + 1][0] for i in range(n - 1))


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(vocab=1), ValueError, "vocab"),
    (dict(vocab=2.5), TypeError, "vocab"),
    (dict(min_len=0), ValueError, "min_len"),
    (dict(min_len=9, max_len=4), ValueError, "max_len"),
    (dict(order="sideways"), ValueError, "order"),
])
def test_task_rejects_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        Transliteration(**kwargs)


def test_task_sample_and_buckets_reject_bad_arguments():
    task = Transliteration()
    with pytest.raises(ValueError, match="length"):
        task.sample(2, 0)
    with pytest.raises(TypeError, match="batch"):
        task.sample("2", 3)
    with pytest.raises(ValueError, match="buckets"):
        buckets_for(5, 7, 4)


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_decoding_matches_teacher_forcing_on_its_own_output(kind):
    """The step-by-step decoder (used for evaluation) and the whole-sequence decoder (used for training)
    compute the same thing: feeding the greedy output back as teacher input reproduces it."""
    torch.manual_seed(0)
    task = Transliteration(vocab=6, min_len=4, max_len=8)
    model = Seq2Seq(task.num_tokens, kind, embed_dim=8, hidden_dim=12).eval()
    b = task.sample(3, 8, torch.Generator().manual_seed(2))
    d = model.greedy(b.src)
    tin = torch.cat([torch.full((3, 1), BOS), d.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits, w = model(b.src, tin)
    assert torch.equal(logits.argmax(-1), d.tokens)
    if kind == "none":
        assert w is None and d.weights is None
    else:
        assert torch.allclose(w, d.weights, atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(3, 8), atol=1e-5)


def test_seq2seq_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        Seq2Seq(10, "bilinear")
    with pytest.raises(ValueError, match="hidden_dim"):
        Seq2Seq(10, "none", hidden_dim=0)
    m = Seq2Seq(10, "luong", 4, 4)
    with pytest.raises(TypeError, match="src"):
        m.greedy(torch.randn(2, 3))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="kind"):
        train("transformer", Transliteration(), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="kinds"):
        compare(Transliteration(), TrainConfig(steps=1), kinds=("none", "gru"))


def test_training_is_seeded_and_learns():
    task = Transliteration(vocab=5, min_len=3, max_len=6)
    cfg = TrainConfig(steps=60, hidden_dim=16, embed_dim=8, batch_size=16, seed=4)
    a, b = train("luong", task, cfg), train("luong", task, cfg)
    assert a.losses == b.losses
    assert sum(a.losses[-10:]) / 10 < 0.8 * sum(a.losses[:10]) / 10


def test_offset_mass_on_hand_made_maps():
    eye = torch.eye(5).unsqueeze(0)
    m = offset_mass(eye, torch.arange(5))
    assert [float(m[o][0]) for o in (-2, -1, 0, 1, 2)] == [0.0, 0.0, 1.0, 0.0, 0.0]
    shifted = torch.roll(eye, 1, dims=2)  # step t attends to t + 1 (the last wraps to 0)
    m = offset_mass(shifted, torch.arange(5))
    assert float(m[1][0]) == pytest.approx(4 / 5) and float(m[0][0]) == 0.0
    uniform = torch.full((2, 4, 4), 0.25)
    m = offset_mass(uniform, torch.arange(4).flip(0))
    assert torch.allclose(m[0], torch.full((2,), 0.25))
    # offsets past either end weigh nothing: from position 0, offset -1 is outside
    assert float(offset_mass(eye[:, :1, :1], torch.zeros(1, dtype=torch.long))[-1][0]) == 0.0
    with pytest.raises(ValueError, match="aligned"):
        offset_mass(eye, torch.arange(3))


def test_evaluate_reports_consistent_metrics():
    task = Transliteration(vocab=5, min_len=2, max_len=7)
    model = Seq2Seq(task.num_tokens, "additive", 8, 8)
    ms = evaluate(model, task, [(2, 4), (5, 7)], per_bucket=9)
    for m in ms:
        assert 0 <= m.sequence_accuracy <= m.token_accuracy <= 1
        assert m.aligned_mass == pytest.approx(m.offset_mass[0])
        assert 0 <= sum(m.offset_mass.values()) <= 1 + 1e-6
    assert ms[0].chance_mass == pytest.approx((3 / 2 + 3 / 3 + 3 / 4) / 9)
    assert evaluate(Seq2Seq(task.num_tokens, "none", 4, 4), task, [(2, 3)], per_bucket=2)[0].aligned_mass is None


# ------------------------------------------------------------------------------------------ efficiency


def test_fit_slope_recovers_exponents():
    assert fit_slope([(n, 3e-6 * n**2) for n in (512, 1024, 2048, 4096)]) == pytest.approx(2.0)
    assert fit_slope([(n, 5.0 * n) for n in (100, 200, 400)]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 points"):
        fit_slope([(512, 1.0)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident set read from /proc (Linux)")
def test_peak_rss_sees_a_large_allocation():
    with PeakRSS() as m:
        x = torch.ones(96 << 20, dtype=torch.uint8)
        del x
    assert m.peak >= 64 << 20


def test_sweep_measures_and_stops_at_the_time_limit():
    res = sweep(methods=("full", "sliding_window", "linear", "performer", "textbook"), min_len=32, max_len=64,
                heads=1, head_dim=8, window=8, features=16, repeats=1, min_time=0.0)
    assert {(p.method, p.length) for p in res.points} == {(m, n) for m in efficiency.METHODS for n in (32, 64)}
    assert all(p.seconds > 0 for p in res.points)
    assert all(why.startswith("reached") for why in res.stopped.values())
    short = sweep(methods=("full",), min_len=32, max_len=128, heads=1, head_dim=8, time_limit=1e-12, repeats=1)
    assert [p.length for p in short.points] == [32] and "time limit" in short.stopped["full"]
    d = res.to_dict()
    assert set(d) == {"config", "points", "stopped", "slope_time", "slope_memory", "slope_fit"}


def test_sweep_rejects_bad_arguments():
    with pytest.raises(ValueError, match="methods"):
        sweep(methods=("flash",), min_len=8, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        sweep(methods=("full",), min_len=64, max_len=32)


# -------------------------------------------------------------------------------------- report and cli


def test_table_and_progress():
    assert report.table(["a", "b"], [["x", 1]]).splitlines() == ["a  b", "-  -", "x  1"]
    s = io.StringIO()
    p = report.Progress(stream=s, tty=False)
    for i in range(1, 101):
        p.update("train none", i, 100, "loss 1")
    lines = s.getvalue().splitlines()
    assert 3 <= len(lines) <= 6 and "100/100" in lines[-1]


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv, words", [
    (["--parts", "speed"], "--parts"),
    (["--models", "none,gru"], "--models"),
    (["--methods", "flash"], "--methods"),
    (["--steps", "0"], "--steps"),
    (["--min-len", "9", "--max-len", "5"], "--max-len"),
    (["--buckets", "50", "--quick"], "--buckets"),
    (["--eff-min-len", "4096", "--eff-max-len", "512"], "--eff-max-len"),
    (["--time-limit", "0"], "--time-limit"),
])
def test_cli_rejects_bad_options(argv, words, capsys):
    with pytest.raises(ValueError, match=words):
        settings(_parse(argv))
    assert run(_parse(argv)) == 2
    assert words in capsys.readouterr().err


def test_quick_preset_is_smaller_than_the_default():
    q, f = settings(_parse(["--quick"])), settings(_parse([]))
    assert q["steps"] < f["steps"] and q["max_len"] < f["max_len"] and q["eff_max_len"] < f["eff_max_len"]
    assert f["max_len"] == 60 and f["eff_max_len"] == 65536 and q == {**q, **PRESETS["quick"]}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from salience.cli import main

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    old = sys.stdout
    sys.stdout = buf
    try:
        rc = main(["demo", "--quick", "--out", str(out)])
    finally:
        sys.stdout = old
    return rc, out, buf.getvalue(), json.loads((out / "results.json").read_text())


def test_quick_demo_end_to_end(quick_run):
    rc, out, text, res = quick_run
    assert rc == 0
    for name in ("index.html", "results.json", "accuracy.png", "alignment.png", "heatmaps.png", "training.png",
                 "efficiency.png"):
        assert (out / name).stat().st_size > 1000, name
    page = (out / "index.html").read_text()
    assert "Token accuracy" in page and page.count("data:image/png;base64,") == 5
    assert "src=\"http" not in page and "href=\"http" not in page  # nothing loaded from the network
    for words in ("Token accuracy", "Sequence accuracy", "attention mass", "Efficiency", "slope"):
        assert words in text, words
    assert set(res["accuracy"]["metrics"]) == set(KINDS)
    eff = res["efficiency"]
    assert {p["method"] for p in eff["points"]} == set(efficiency.METHODS)
    assert all(m in eff["stopped"] for m in efficiency.METHODS)


def test_quick_demo_attention_beats_no_attention_on_the_longest_bucket(quick_run):
    """The claim the demo exists to show, checked on the seeded --quick run."""
    _, _, _, res = quick_run
    metrics = res["accuracy"]["metrics"]
    base = metrics["none"][-1]
    for kind in ("additive", "luong"):
        m = metrics[kind][-1]
        assert m["lo"] == base["lo"] and m["hi"] == PRESETS["quick"]["max_len"]
        assert m["token_accuracy"] > base["token_accuracy"] + 0.2, (kind, m, base)
        assert m["sequence_accuracy"] >= base["sequence_accuracy"]
    best = max(metrics[k][-1]["sequence_accuracy"] for k in ("additive", "luong"))
    assert best > base["sequence_accuracy"] + 0.2
    # the attention models attend to the aligned token (or its neighbour) far above chance on long inputs
    for kind in ("additive", "luong"):
        m = metrics[kind][-1]
        near = sum(m["offset_mass"][str(o)] for o in (-1, 0, 1))
        assert near > 5 * m["chance_mass"], (kind, near, m["chance_mass"])


def test_quick_demo_interactive_page(quick_run):
    _, out, _, _ = quick_run
    page = out / "attention.html"
    assert page.exists() and "salience-data" in page.read_text()


def test_report_from_a_tiny_run(tmp_path):
    task = Transliteration(vocab=5, min_len=2, max_len=5)
    c = compare(task, TrainConfig(steps=2, hidden_dim=8, embed_dim=4), buckets=[(2, 3), (4, 5)], per_bucket=4)
    acc = report.accuracy_table(c).splitlines()
    assert acc[0].split()[-2:] == ["2-3", "4-5"] and len(acc) == 2 + len(KINDS)
    al = report.alignment_table(c)
    assert "chance" in al and "no attention" not in al  # only models with attention have a mass
    off = report.offset_table(c).splitlines()
    assert off[0].split()[-5:] == ["-2", "-1", "+0", "+1", "+2"] and len(off) == 2 + 2 * 2
    figs = {"accuracy": report.plot_accuracy(c, tmp_path / "a.png"),
            "heatmaps": report.plot_heatmaps(c, task, tmp_path / "h.png")}
    res = sweep(methods=("full", "linear"), min_len=16, max_len=32, heads=1, head_dim=4, repeats=1)
    figs["efficiency"] = report.plot_efficiency(res, tmp_path / "e.png")
    page = report.write_html(tmp_path, command="salience demo", comparison=c, task=task, sweep=res,
                             figures=figs).read_text()
    assert page.count("data:image/png;base64,") == 3 and "full: reached max_len=32" in page
    assert "src=\"http" not in page and "href=\"http" not in page


def test_reproduction_command_round_trips():
    import shlex

    from salience.demos.cli import _command

    for argv in (["--quick"], ["--steps", "10", "--models", "none,luong", "--seed", "3", "--time-limit", "5",
                               "--order", "reverse", "--out", "my dir"]):
        s = settings(_parse(argv))
        again = settings(_parse(shlex.split(_command(s))[2:]))
        assert again == s
