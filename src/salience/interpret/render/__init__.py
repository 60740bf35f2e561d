"""Pictures of attention: :mod:`~salience.interpret.render.png` (matplotlib figures as PNG/SVG/PDF) and
:mod:`~salience.interpret.render.html` (one self-contained HTML report, no network).

Example:
    >>> from salience.interpret.render import html
    >>> callable(html.report)
    True
"""

__all__ = ["png", "html"]


def __getattr__(name):  # import lazily: png needs matplotlib, html needs nothing beyond torch
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
