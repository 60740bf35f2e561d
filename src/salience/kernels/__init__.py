"""Compute paths behind :func:`salience.attention`: dispatch, blockwise tiles, merge."""
