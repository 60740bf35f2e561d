"""``salience explain`` end to end on a short text with the embedded MiniLM, and its argument errors."""

import argparse

import pytest

from salience import cli
from salience.explain import Progress, parse_layers, parse_methods
from salience.interpret import AttentionMaps

TEXT = "The cat sat on the mat."


def test_explain_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["explain", TEXT, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    for name in ("report.html", "maps.npz", "grid.png", "last_layer.png", "importance.png", "entropy.png"):
        assert (out / name).stat().st_size > 1000, name
    text = captured.out
    assert "most-attended tokens per layer" in text and "layer  5:" in text
    assert "entropy per head" in text and "h11" in text
    assert "faithfulness:" in text and "Spearman" in text and "rollout" in text and "chance band" in text
    assert "[" in captured.err and "6/6" in captured.err  # the progress bar reached the end
    maps = AttentionMaps.load(out / "maps.npz")
    assert len(maps.maps) == 6 and maps.tokens[0] == "[CLS]" and maps.tokens[-2] == "."
    page = (out / "report.html").read_text()
    assert "salience explain: The cat sat on the mat." in page and "http" not in page.split("<style>")[1]


def test_explain_pair_layers_and_methods(tmp_path, capsys):
    out = tmp_path / "r2"
    rc = cli.main(["explain", TEXT, "--out", str(out), "--pair", "A kitten rests on a rug.", "--layers", "4-5",
                   "--heads", "0,1", "--method", "rollout,grad", "--no-png", "--quiet", "--dtype", "float16"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer  4:" in text and "layer  3:" not in text
    assert "cosine similarity with 'A kitten rests on a rug.'" in text and "gradient x attention" in text
    maps = AttentionMaps.load(out / "maps.npz")
    assert [e["layer"] for e in maps.entries] == [4, 5] and maps.maps[0].shape[1] == 2
    assert str(maps.maps[0].dtype) == "torch.float16"
    assert not (out / "grid.png").exists()


def test_argument_parsing():
    assert parse_layers("all") is None
    assert parse_layers("0,2,5") == [0, 2, 5] and parse_layers("1-3") == [1, 2, 3] and parse_layers("-1") == [-1]
    assert parse_methods("all")[0] == "raw" and parse_methods("flow, entropy") == ["flow", "entropy"]
    with pytest.raises(argparse.ArgumentTypeError, match="--layers takes"):
        parse_layers("first")
    with pytest.raises(argparse.ArgumentTypeError, match="--method takes"):
        parse_methods("lime")


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", TEXT, "--layers", "x"])
    assert e.value.code == 2 and "--layers takes" in capsys.readouterr().err
    assert cli.main(["explain", "   ", "--out", str(tmp_path)]) == 2
    assert "TEXT is empty" in capsys.readouterr().err
    assert cli.main(["explain", TEXT, "--out", str(tmp_path), "--pool", "0"]) == 2
    assert cli.main(["explain", TEXT, "--out", str(tmp_path), "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "salience explain: error: --model must be" in capsys.readouterr().err


def test_progress_bar_lines():
    import io

    s = io.StringIO()
    p = Progress(2, stream=s)
    p.step("one")
    p.step("two")
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("[" + "#" * 12 + "." * 12 + "] 1/2 one") and "2/2 two" in lines[1]


def test_explain_local_classifier_path(tmp_path, capsys):
    """--model PATH with a (tiny, randomly initialised) sequence classifier saved locally."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import salience.models

    _, tok = salience.models.minilm()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    out = tmp_path / "out"
    assert cli.main(["explain", TEXT, "--model", str(tmp_path / "clf"), "--out", str(out), "--no-png",
                     "--quiet", "--label", "1"]) == 0
    text = capsys.readouterr().out
    assert "logit of class 1" in text and "layer  1:" in text and "gradient x attention" in text
    assert len(AttentionMaps.load(out / "maps.npz").maps) == 2
