"""The offline logits store: precomputed teacher targets, read by global sample index.

``format`` (constants, sections, sample identity, manifest schema), ``codec`` (ids, counts,
log-probs -- fp16/fp32 and the quantised qlog -- and residuals to bytes and back), ``encode`` (a
shard's bytes), ``decode`` (``Shard``: reading one), ``writer`` (atomic files, resume), ``sparse``
(top-p-k and RS-KD targets from vocab-parallel logits), ``precompute`` (the teacher over a run's
samples), ``recorder`` (a run recording its own logits), with ``pieces`` (its staging files and
the assembly of a shard from them) and ``recording_plan`` (a recorded store's plan and identity),
``reader`` (verified memory-mapped reads, ``OfflineTeacher``), ``inspect_store`` (``store
info|verify``), ``estimate`` (a store's size, for ``megadistill plan``).
The on-disk format is described in ``FORMAT.md``.
"""
