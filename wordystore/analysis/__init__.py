"""Analyses of a trajectory: streaming statistics (:mod:`.measures`, cached under ``analysis/``, on a
dask cluster when given one) and the report's plots and ``report.md`` (:mod:`.report`).

>>> from wordystore import analysis
>>> stats = analysis.embedding_stats(t, "untrained")  # doctest: +SKIP
"""

from wordystore.analysis.measures import EmbeddingStats, curves, embedding_stats, largest_jump, moment_norms

__all__ = ["EmbeddingStats", "curves", "embedding_stats", "largest_jump", "moment_norms"]
