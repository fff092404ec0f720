"""SALT_DS (Rawat et al. 2024): a small teacher scores every training sequence ("challenging yet
learnable"), and SALT's phase 1 trains only on the selected ones.

* :mod:`megadistill.salt.score` — per-token teacher loss restricted to targets inside the teacher's
  top-k, the per-sequence median, and ``megadistill score-data`` (data/tensor-parallel, resumable);
* :mod:`megadistill.salt.scorefile` — the score directory: arrays, manifest, checks;
* :mod:`megadistill.salt.selection` — top fraction or quantile band, and the phase-1/phase-2
  sampler (:func:`~megadistill.salt.selection.sampler_for_run`);
* :mod:`megadistill.salt.histogram` — the scores' histogram with the selected band.
"""
