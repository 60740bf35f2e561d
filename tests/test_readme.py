"""The README's example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["out"].shape == (2, 8, 1024, 64)
    assert ns["w"].shape == (2, 1, 1, 1024)
    assert "backend=" in capsys.readouterr().out
