"""SALT_DS selection and the two-phase sampler.

:func:`select` picks, among the *selectable* samples (a finite score and at least
``data_selection.min_learnable_tokens`` learnable tokens), either the top ``fraction`` by score
(``select: top_fraction``) or the ranks between two score quantiles (``select: band``). Ranks are
taken in (score, global index) order, so ties and the result are fully deterministic.

:class:`SaltSampler` hands phase 1 (steps ``< phase1_steps``) the selected indices in ascending
global index order — the GPTDataset's sample order is already a seeded shuffle — global batch
after global batch, cycling when phase 1 needs more samples than were selected; from
``phase1_steps`` on it is ``ContiguousSampler``, the run's full data. Like every sampler it is a
pure function of the step: each global batch is the same whatever the data-parallel size, and a
resumed run reads what the uninterrupted one read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megadistill.salt.scorefile import ScoreFileError
from megadistill.sampler import ContiguousSampler


@dataclass(frozen=True)
class Selection:
    """The samples a selection keeps."""

    indices: np.ndarray
    """``[n]`` int64 selected global sample indices, ascending."""
    selectable: int
    """How many samples were selectable."""
    low_score: float
    """Lowest selected score."""
    high_score: float
    """Highest selected score."""
    how: str
    """The rule, e.g. ``top 50%`` or ``quantiles 0.25-0.75``."""

    def describe(self) -> str:
        return f"{self.how}, scores {self.low_score:.3f}..{self.high_score:.3f}"


def select(scores: np.ndarray, counts: np.ndarray, sel) -> Selection:
    """Apply ``sel`` (a ``DataSelectionConfig``) to ``scores[N]`` and ``learnable_tokens[N]``.

    ``top_fraction`` keeps the ``round(fraction · n)`` highest-scoring of the ``n`` selectable
    samples (at least one); ``band`` keeps ranks ``[round(low_quantile · n), round(high_quantile · n))``
    of them in ascending score order. Raises ``ScoreFileError`` if nothing is selected."""
    scores = np.asarray(scores, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(scores) & (np.asarray(counts) >= sel.min_learnable_tokens))
    n = ok.size
    if n == 0:
        raise ScoreFileError(
            f"no sample has data_selection.min_learnable_tokens={sel.min_learnable_tokens} learnable tokens "
            f"(target in the teacher's top-{sel.top_k}): lower it, or raise data_selection.top_k and score again")
    ranked = ok[np.lexsort((ok, scores[ok]))]  # ascending score, ties by ascending index
    if sel.select == "top_fraction":
        lo, hi, how = n - max(1, round(sel.fraction * n)), n, f"top {sel.fraction:.0%}"
    elif sel.select == "band":
        lo, hi = round(sel.low_quantile * n), round(sel.high_quantile * n)
        how = f"quantiles {sel.low_quantile:g}-{sel.high_quantile:g}"
    else:
        raise ScoreFileError(f"data_selection.select: {sel.select!r} is not one of ('top_fraction', 'band')")
    if hi <= lo:
        raise ScoreFileError(
            f"data_selection.low_quantile={sel.low_quantile} and high_quantile={sel.high_quantile} select no sample "
            f"of the {n} selectable ones: widen the band")
    chosen = ranked[lo:hi]
    return Selection(np.sort(chosen).astype(np.int64), n, float(scores[chosen].min()), float(scores[chosen].max()), how)


class SaltSampler:
    """SALT's sampler: the selected samples before ``phase1_steps``, all samples from then on.

    Phase-1 global batch ``step`` is positions ``[step·G, (step+1)·G)`` of ``selected`` (modulo
    its length); rank ``r`` takes the ``r``-th ``G/dp`` of them, as ``ContiguousSampler`` does.
    """

    def __init__(self, selected: Sequence[int], global_batch_size: int, dp_size: int, phase1_steps: int) -> None:
        self.selected = np.asarray(selected, dtype=np.int64)
        if self.selected.ndim != 1 or self.selected.size == 0:
            raise ValueError("SaltSampler needs a non-empty 1-D list of selected sample indices")
        if phase1_steps < 0:
            raise ValueError(f"phase1_steps must be >= 0, got {phase1_steps}")
        self.phase1_steps = phase1_steps
        self.full = ContiguousSampler(global_batch_size, dp_size)  # checks G % dp
        self.global_batch_size, self.dp_size = global_batch_size, dp_size

    @property
    def cycles(self) -> float:
        """How many times phase 1 goes through the selection (> 1: samples repeat)."""
        return self.phase1_steps * self.global_batch_size / self.selected.size

    def in_phase1(self, step: int) -> bool:
        return step < self.phase1_steps

    def indices(self, step: int, dp_rank: int) -> Sequence[int]:
        if not self.in_phase1(step):
            return self.full.indices(step, dp_rank)
        per_rank = self.global_batch_size // self.dp_size
        start = step * self.global_batch_size + dp_rank * per_rank
        return self.selected[np.arange(start, start + per_rank) % self.selected.size].tolist()


def sampler_for_run(cfg, dp_size: int, phase1_steps: int, dataset=None, start_step: int = 0):
    """The run's sampler: :class:`SaltSampler` over ``data_selection.scores`` for the first
    ``phase1_steps`` steps, then the full data; ``ContiguousSampler`` when ``data_selection.scores``
    is unset.

    Not collective (every rank may call it; each reads the score file). Verifies first, raising
    ``ScoreFileError`` (a ``ConfigError``) that names every problem: the score files' checksums,
    that the teacher (``teacher.checkpoint`` files and ``teacher.model``), the tokenizer, the data
    (``.idx`` sha256, split, seed, sequence length), the number of training samples and
    ``data_selection.top_k`` are the scoring run's. With the run's training ``dataset`` given,
    also the token hashes of up to 256 selected samples spread over the selection. Warns (on
    global rank 0) when phase 1 needs more samples than were selected (it cycles over them).

    A run resuming at ``start_step >= phase1_steps`` reads only the full data: it gets the
    ``ContiguousSampler`` (the same indices the ``SaltSampler`` gives from then on) and needs
    neither the score file nor the teacher.
    """
    from megadistill.hashing import file_sha256
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.salt.scorefile import ScoreFile, dataset_identity, run_mismatches, teacher_identity, tokenizer_path

    sel, G = cfg.data_selection, cfg.data.global_batch_size
    if not sel.scores or start_step >= phase1_steps:
        return ContiguousSampler(G, dp_size)
    if cfg.teacher.checkpoint is None:
        raise ScoreFileError("teacher.checkpoint is required with data_selection.scores: the score file is checked "
                             "against the teacher that scored the data")
    f = ScoreFile(sel.scores)
    tok = tokenizer_path(cfg)
    if not tok.is_file():
        raise ScoreFileError(f"the run's tokenizer {tok} does not exist, so the scores in {sel.scores} cannot be checked")
    teacher = teacher_identity(cfg, resolve_teacher_checkpoint(cfg.teacher.checkpoint))
    problems = run_mismatches(f.manifest, cfg, teacher, file_sha256(tok), dataset_identity(cfg))
    if problems:
        raise ScoreFileError(f"data_selection.scores {sel.scores} was not made for this run: " + "; ".join(problems))
    chosen = select(f.scores, f.learnable_tokens, sel)
    if dataset is not None:
        check_samples(f, dataset, chosen.indices[np.linspace(0, chosen.indices.size - 1, min(256, chosen.indices.size)).astype(np.int64)])
    sampler = SaltSampler(chosen.indices, G, dp_size, phase1_steps)
    if sampler.cycles > 1 and _first_rank():
        warnings.warn(
            f"SALT_DS phase 1 ({phase1_steps} steps x {G} sequences = {phase1_steps * G}) needs more samples than "
            f"the {chosen.indices.size} selected ({chosen.describe()}): it cycles over the selection "
            f"{sampler.cycles:.2f} times; raise data_selection.fraction (or widen the band) to avoid repeats",
            stacklevel=2)
    return sampler


def _first_rank() -> bool:
    """Global rank 0, or no process group: where a run-wide warning is said once."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_samples(f, dataset, indices) -> None:
    """Raise ``ScoreFileError`` unless ``dataset[i]``'s tokens and labels are the ones sample ``i``
    was scored on, for each ``i`` in ``indices``."""
    from megadistill.store.format import sample_hash

    for i in map(int, indices):
        s = dataset[i]
        if sample_hash(s["tokens"], s["labels"]) != bytes(f.sample_hashes[i]):
            raise ScoreFileError(
                f"data_selection.scores {f.path}: sample {i}'s tokens differ from the ones it was scored on "
                "(other data, seed, sequence length or tokenizer than the scoring run's): score again")


def selection_for_run(cfg) -> Optional[Selection]:
    """``cfg``'s selection from its score file (no run checks; for reports), None without one."""
    from megadistill.salt.scorefile import ScoreFile

    if not cfg.data_selection.scores:
        return None
    f = ScoreFile(Path(cfg.data_selection.scores))
    return select(f.scores, f.learnable_tokens, cfg.data_selection)
