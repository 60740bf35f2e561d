import subprocess
import sys

import torch

from salience.walkthrough import walkthrough


def test_walkthrough_uses_the_words_and_is_seeded():
    a = walkthrough("attention is all you need", dim=4, seed=3)
    assert a == walkthrough("attention is all you need", dim=4, seed=3)
    assert a != walkthrough("attention is all you need", dim=4, seed=4)
    for word in ("attention", "need"):
        assert word in a
    for step in ("Raw scores", "Scaled scores", "Softmax weights", "Output = weights V", "causal mask",
                 "Additive (Bahdanau)", "Two heads"):
        assert step in a, step
    check = [line for line in a.splitlines() if "Check:" in line][0]
    assert float(check.split("max difference ")[1].rstrip(").")) < 1e-12


def test_walkthrough_rows_sum_to_one():
    text = walkthrough("a b c", dim=2, seed=0)
    lines = text.splitlines()
    start = lines.index("7. Softmax weights") + 3
    rows = [[float(x) for x in lines[start + i].split()[1:]] for i in range(3)]
    for r in rows:
        assert abs(sum(r) - 1) < 2e-3
    causal_start = lines.index("10. Causal softmax weights") + 3
    first = [float(x) for x in lines[causal_start].split()[1:]]
    assert first == [1.0, 0.0, 0.0]
    assert torch.tensor(rows).shape == (3, 3)


def test_walkthrough_cli():
    out = subprocess.run([sys.executable, "-m", "salience.cli", "walkthrough", "hello attention world", "--seed", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hello" in out.stdout and "Softmax weights" in out.stdout
