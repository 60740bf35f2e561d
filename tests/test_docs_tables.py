"""The measured tables in README.md and docs/*.md match the result files under benchmarks/results/.

Runs ``benchmarks/docs_tables.py --check`` (renders from the kept JSON; no benchmark is run). When this fails,
a table was edited by hand or its JSON was rewritten: rerun the benchmark if needed, then
``python benchmarks/docs_tables.py --write``.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["docs_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


D = _module()


def test_every_table_matches_its_result_file(capsys):
    rc = D.main(["--check"])
    err = capsys.readouterr().err
    assert rc == 0, err


def test_every_registered_table_is_in_some_doc_and_every_marker_has_a_renderer():
    where = D.found(D.docs())
    assert set(where) == set(D.TABLES), (set(where) ^ set(D.TABLES))
    for name, t in D.TABLES.items():
        assert (ROOT / "benchmarks" / "results" / t.result).exists(), name


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """A copy of the README and docs under tmp_path, with docs_tables pointed at it."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png", "*.html"))
    monkeypatch.setattr(D, "ROOT", str(tmp_path))
    monkeypatch.setattr(D, "docs", lambda root=None: _docs(tmp_path))
    return tmp_path


def _docs(root: Path) -> list[str]:
    return [str(root / "README.md")] + sorted(str(p) for p in (root / "docs").glob("*.md"))


def test_a_changed_number_fails_and_names_file_and_table(copy, capsys):
    p = copy / "docs" / "kernels.md"
    text = p.read_text()
    begin = text.index("<!-- table:edges-cost:begin -->")
    row = text.index("| sliding window 256 | spans |", begin)
    end = text.index("\n", row)
    p.write_text(text[:row] + "| sliding window 256 | spans | 1.0 | 1.0 | 1.000 |" + text[end:])
    assert D.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/kernels.md: table 'edges-cost' differs from benchmarks/results/edges_cost.json" in err
    assert "-| sliding window 256 | spans | 1.0 | 1.0 | 1.000 |" in err
    assert D.main(["--write"]) == 0
    assert D.main(["--check"]) == 0
    assert p.read_text() == (ROOT / "docs" / "kernels.md").read_text()


def test_unknown_marker_fails(copy, capsys):
    p = copy / "docs" / "masks.md"
    p.write_text(p.read_text() + "\n<!-- table:nonesuch:begin -->\n| a |\n<!-- table:nonesuch:end -->\n")
    assert D.main(["--check"]) == 1
    assert "table 'nonesuch' has markers but no renderer" in capsys.readouterr().err


def test_a_changed_figure_in_prose_fails(copy, capsys):
    p = copy / "README.md"
    text = " ".join(p.read_text().split())
    phrase = D._fig_million(D._load("million.json"))
    assert phrase in text
    p.write_text(text.replace(phrase, phrase.replace("take ", "take 0", 1)))
    assert D.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md: the sentence with figures from benchmarks/results/million.json" in err


def test_renderers_follow_the_json():
    """A changed result changes the rendered table (the JSON wins over the prose)."""
    data = json.loads((ROOT / "benchmarks" / "results" / "edges_cost.json").read_text())
    data["results"][0]["guarded_ms"] = 12345.0
    assert "| 12345.0 |" in D.block("edges-cost", data)
    grid = json.loads((ROOT / "benchmarks" / "results" / "grid.json").read_text())
    for r in grid["results"]:
        if r["config"]["name"] == "window_f32":
            r["impls"]["sdpa"]["speedup_vs_salience"] = 0.5
    assert "2.00x faster than salience" in D.block("grid-ratios", grid)


def test_check_from_the_command_line():
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "docs_tables.py"), "--check"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    assert "figures in prose match their result files" in r.stdout
