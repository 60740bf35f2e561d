"""Demonstrations with measured numbers: ``salience demo`` (see :mod:`salience.demos.cli`).

* :mod:`~salience.demos.task`: the synthetic transliteration task (lengths 5 to 60, known alignment).
* :mod:`~salience.demos.seq2seq`: GRU encoder-decoders without attention, with additive (Bahdanau) and with
  Luong attention; training, per-length-bucket accuracy and aligned attention mass.
* :mod:`~salience.demos.efficiency`: time and peak memory of exact, sliding-window, linear and Performer
  attention as the length doubles, with fitted log-log slopes.
* :mod:`~salience.demos.report`: terminal tables, progress bars, PNGs and the HTML page.

Submodules are imported on use, so ``import salience.demos`` costs nothing.
"""

__all__ = ["task", "seq2seq", "efficiency", "report", "cli"]
