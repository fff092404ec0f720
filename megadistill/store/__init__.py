"""The offline logits store: precomputed teacher targets, read by global sample index.

``format`` (encoding, manifest schema), ``writer`` (atomic files, resume), ``precompute`` (the
teacher over a run's samples), ``reader`` (verified memory-mapped reads, ``OfflineTeacher``).
The on-disk format is described in ``FORMAT.md``.
"""
