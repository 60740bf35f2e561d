"""Former home of the mask analysis, now read from the typed structure (:mod:`salience.structure`).

``row_spans`` is :func:`salience.structure.row_intervals`, and the other names are the structure queries of the
same name. Kept so that code written against ``salience.kernels.spans`` keeps working; new code imports from
:mod:`salience.structure`.

Example:
    >>> from salience import masks
    >>> from salience.kernels.spans import row_spans
    >>> lo, hi = row_spans(masks.sliding_window(2).bind(5, 5), 1, 5, 5)
    >>> lo.tolist(), hi.tolist()
    ([[0, 0, 0, 1, 2]], [[1, 2, 3, 4, 5]])
"""

from __future__ import annotations

from ..structure import document_segments, independent_pieces, relative_band
from ..structure import row_intervals as row_spans

__all__ = ["row_spans", "relative_band", "independent_pieces", "document_segments"]
