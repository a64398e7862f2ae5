"""build-triplets: turn ingested source crops into CnC triplets (I_f, I_b, M, depths) on Ray Data.

:mod:`tasks.triplets.masks` holds the pure mask arithmetic, :mod:`tasks.triplets.stages` the
per-batch model stages, :mod:`tasks.triplets.job` the Ray Data job that chains them.
"""
