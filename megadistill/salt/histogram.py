"""The SALT_DS score histogram (``<scores>/histogram.png``): the selectable samples' scores with
the selected band shaded, drawn when scoring finishes and redrawn for new selection settings."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np

from megadistill.salt.scorefile import HISTOGRAM, ScoreFile, ScoreFileError
from megadistill.salt.selection import select
from megadistill.store.writer import write_atomic


def draw_histogram(out: Path, scores: np.ndarray, counts: np.ndarray, cfg) -> Optional[Path]:
    """``out/histogram.png``: the selectable samples' scores, the selected band shaded. Returns its
    path (None when no sample is selectable)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    sel = cfg.data_selection
    ok = np.isfinite(scores) & (counts >= sel.min_learnable_tokens)
    if not ok.any():
        return None
    try:
        chosen = select(scores, counts, sel)
    except ScoreFileError as e:  # a selection setting must not cost the scores: drawn without a band
        chosen, why = None, str(e)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(scores[ok], bins=60, color="0.55", label=f"selectable ({int(ok.sum())} of {scores.size})")
    if chosen is not None:
        ax.hist(scores[chosen.indices], bins=60, range=(float(scores[ok].min()), float(scores[ok].max())),
                color="tab:orange", alpha=0.8, label=f"selected ({chosen.indices.size}): {chosen.describe()}")
        ax.axvspan(chosen.low_score, chosen.high_score, color="tab:orange", alpha=0.12)
    else:
        ax.text(0.02, 0.9, f"no selection: {why}"[:110], transform=ax.transAxes, fontsize=7, color="tab:red")
    ax.set_xlabel(f"median teacher loss over learnable tokens (target in top-{sel.top_k}; >= {sel.min_learnable_tokens} tokens)")
    ax.set_ylabel("sequences")
    ax.set_title("SALT_DS sequence scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(out / HISTOGRAM, buf.getvalue())
    return out / HISTOGRAM


def redraw_histogram(out: Path, cfg) -> dict:
    """The finished manifest of ``out``, its histogram redrawn for ``cfg``'s selection settings."""
    f = ScoreFile(out)
    draw_histogram(out, f.scores, f.learnable_tokens, cfg)
    return f.manifest
