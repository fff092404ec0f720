"""``megadistill store info`` and ``megadistill store verify``: what a store holds, and a full check."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from megadistill.store.codec import QLOG_STEP, entry_starts
from megadistill.store.format import MANIFEST, TEMPERED_VERSION, StoreError, served_temperatures
from megadistill.store.reader import StoreReader

# Slack for the top-p checks (probability mass): the threshold was decided on float32 sums (~6e-8
# relative per added probability) and fp16 residuals carry 2^-11 relative error.
_MASS_SLACK, _MASS_SLACK_PER_ID = 1e-3, 1.2e-7
# A stored residual r̂ of the exact r (round to nearest): |r̂ - r| <= rel·r + abs (fp16: 2^-11 relative for
# normal numbers, half its smallest subnormal 2^-24 below; fp32 likewise), widened by 1e-9 relative for
# the float64 sums r and the tails come from.
_RESIDUAL_ERROR = {"fp16": (2**-11 + 1e-9, 2**-25), "fp32": (2**-24 + 1e-9, 2**-150)}
# log of the smallest float64 above 0: a tail of -inf means every truncated p_i^(1/τ) was below it.
_LOG_TINY64 = -745.2


def teacher_summary(teacher: dict) -> str:
    """One line describing a manifest's ``identity.teacher``: a precomputed store's checkpoint, or
    the run that recorded the store (for ``megadistill store info``)."""
    run = teacher.get("recorded_by")
    if run is None:
        return f"teacher: {teacher['path']} ({teacher['num_files']} files, sha256 {teacher['files_sha256'][:12]}…)"
    steps = teacher["steps"]
    return (f"teacher: recorded while training, by run {run['name']} ({run['output_dir']}, config sha256 "
            f"{run['config_sha256'][:12]}…), steps {steps['first']}..{steps['last']}: sample i at step i // "
            f"{steps['global_batch_size']}")


def info(path: str | Path) -> list[str]:
    """Lines describing a finished store: settings, size, bytes/token, ids/position, coverage."""
    reader = StoreReader(path, verify=False)
    m = reader.manifest
    ident = m["identity"]
    seq = ident["dataset"]["seq_length"]
    tokens = m["num_samples"] * seq
    entries = 0
    for i, _ in enumerate(m["shards"]):
        sh = reader.shard(i)
        entries += sh.entries
    ds = ident["dataset"]
    return [
        f"store {reader.path}: format {m['format_version']}, {m['kind']}",
        *_settings(m),
        teacher_summary(ident["teacher"]),
        f"tokenizer sha256 {ident['tokenizer_sha256'][:12]}…",
        f"dataset: {ds.get('data_prefix') or ds.get('inputs')}, {ds['num_documents']} documents, seq_length {seq}, "
        f"split {ds['split']}, seed {ds['seed']}",
        f"coverage: samples 0..{m['num_samples'] - 1} ({tokens} tokens) in {len(m['shards'])} shards of {m['samples_per_shard']}",
        f"size: {m['total_bytes']} bytes = {m['total_bytes'] / max(tokens, 1):.1f} bytes/token; "
        f"{entries / max(tokens, 1):.2f} ids/position on average",
        *_protection(reader),
    ]


def _protection(reader: StoreReader) -> list[str]:
    """A note for a store whose manifest carries no checksum (written before format version 3)."""
    if reader.protected:
        return []
    return [f"note: {MANIFEST} is unprotected (format version {reader.manifest['format_version']}, written before "
            "manifest checksums): an edit to it is noticed only where the shards contradict it"]


def _settings(m: dict) -> list[str]:
    enc = m["encoding"]
    zstd = ", zstd-compressed sections" if enc.get("compression") == "zstd" else ""
    if m["kind"] == "rskd":
        smp = m["sampling"]
        tau = served_temperatures(m)[0]
        return [f"sampling: RS-KD, {smp['draws']} draws per position from the τ = {tau:g} distribution (seed "
                f"{smp['seed']}); targets are the empirical distributions count/draws, for a KD loss at τ {tau:g} only",
                f"encoding: vocab {enc['vocab_size']} -> {enc['id_bits']}-bit ids, {enc['draw_dtype']} draw counts{zstd}"]
    trunc = m["truncation"]
    lp, res = enc["logprob_dtype"], enc.get("residual_dtype", enc["logprob_dtype"])
    what = f"{lp} log-probs and residuals" if lp == res else f"{lp} log-probs, {res} residuals"
    temps = served_temperatures(m)
    tails = [t for t in temps if t != 1.0]
    held = (f"tempered tails for τ {', '.join(f'{t:g}' for t in tails)} (float32, {4 * len(tails)} B/token before "
            "zstd)" if tails else "no tempered tails")
    old = "" if m["format_version"] >= TEMPERED_VERSION else f" (format version {m['format_version']}: before tempered tails)"
    return [f"truncation: top_p={trunc['top_p']} top_k={trunc['top_k']} (ties with the last kept id kept)",
            f"temperatures: a ghost-bucket loss at τ {', '.join(f'{t:g}' for t in temps)}{old}; a renormalising "
            f"loss at any τ; {held}",
            f"encoding: vocab {enc['vocab_size']} -> {enc['id_bits']}-bit ids, {what}{zstd}"]


def encoding_error(counts, logprobs, residual, got_logprobs, got_residual) -> dict:
    """How far decoded targets are from exact ones, all flat over one or more samples' positions:
    ``counts[s]``, exact ``logprobs[Σ counts]`` and ``residual[s]`` (float64), decoded
    ``got_logprobs[Σ counts]`` and ``got_residual[s]``.

    Returns ``max_abs_dp`` (max |p̂ - p| over kept ids), ``max_abs_dlogp`` (max |log p̂ - log p|),
    and ``mean_kl``/``max_kl`` over positions of KL(stored ‖ exact) on the partition the ghost-bucket
    loss compares (each kept id, plus one bucket for the residual), each side normalised to 1 as the
    loss normalises it. Float64 throughout."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    lp, glp = np.asarray(logprobs, np.float64), np.asarray(got_logprobs, np.float64)
    r, gr = np.asarray(residual, np.float64), np.asarray(got_residual, np.float64)

    def log_norm(lps, res):
        z = np.add.reduceat(np.exp(lps), starts) + res
        return np.log(z)

    lz, glz = log_norm(lp, r), log_norm(glp, gr)
    lq, glq = lp - np.repeat(lz, counts), glp - np.repeat(glz, counts)
    kept = np.add.reduceat(np.exp(glq) * (glq - lq), starts)
    with np.errstate(divide="ignore", invalid="ignore"):
        ghost = np.where(gr > 0, gr / np.exp(glz) * (np.log(gr) - glz - np.log(r) + lz), 0.0)
    kl = kept + ghost
    return {"max_abs_dp": float(np.abs(np.exp(glp) - np.exp(lp)).max()),
            "max_abs_dlogp": float(np.abs(glp - lp).max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def verify(path: str | Path, dataset=None) -> list[str]:
    """Check the manifest's checksum and every shard against the manifest: its sha256, its header
    (sample range, kind, vocabulary, encoding, draws, temperatures), and every sample decoded and
    held to what the manifest declares (:func:`sample_problem`: ids inside the vocabulary, ids per
    position within the truncation or the draws, finite log-probs, residuals in [0, 1], tempered
    tails within the bounds the kept ids and the residual set); with ``dataset``
    (the run's training ``GPTDataset``), each sample's token hash against it. Raises
    ``StoreError`` at the first problem; returns a summary."""
    from megadistill.store.format import sample_hash

    reader = StoreReader(path, verify=True)  # the manifest's checksum and shard list, on open
    m = reader.manifest
    for i, entry in enumerate(m["shards"]):
        sh = reader.shard(i)  # its sha256 and its header against the manifest
        for j in range(sh.first_sample, sh.first_sample + sh.num_samples):
            problem = sample_problem(sh, j, m)
            if problem:
                raise StoreError(f"logits store {reader.path}: shard {entry['file']}, sample {j}: {problem}")
            if dataset is not None:
                s = dataset[j]
                if sample_hash(s["tokens"], s["labels"]) != bytes(sh.hashes[j - sh.first_sample]):
                    raise StoreError(f"shard {entry['file']}, sample {j}: the dataset's tokens differ from the store's")
    checked = " and against the run's dataset" if dataset is not None else ""
    return [f"store {reader.path}: {len(m['shards'])} shards, {m['num_samples']} samples: checksums and contents OK, "
            f"consistent with {MANIFEST}{checked}", *_protection(reader)]


def sample_problem(shard, index: int, manifest: dict) -> str:
    """What global sample ``index`` of ``shard`` holds that ``manifest`` rules out, in a phrase
    naming the position and the manifest's key ("" if nothing).

    Every kind: at least one id per position, every id below ``encoding.vocab_size``. RS-KD: at
    most ``sampling.draws`` distinct ids per position, their draw counts >= 1 and summing to the
    draws. Top-p-k (``truncation``; ids tied with the last kept one are kept too): finite
    log-probs, residuals in [0, 1]; more than ``top_k`` ids only where the extra ones tie the
    ``top_k``-th; with ``top_p`` < 1, the mass above a position's last kept log-prob below
    ``top_p`` and, where ``top_k`` did not cut, the kept mass ``1 - residual`` at least ``top_p``
    (both to within the encoding's precision); with ``top_p`` = 1, at least ``top_k`` ids; tempered
    tails (:func:`tail_problem`) within what the kept ids and the residual imply."""
    counts, ids, lp, res, tails = shard.sample_flat(index)
    vocab = manifest["encoding"]["vocab_size"]
    if not counts.size:
        return ""
    if counts.min() < 1:
        return f"position {int(np.argmin(counts))} holds no id"
    if ids.size and ids.max() >= vocab:
        return f"id {int(ids.max())} is outside the vocabulary of {vocab} (encoding.vocab_size in {MANIFEST})"
    starts = entry_starts(counts)
    if manifest["kind"] == "rskd":
        draws = manifest.get("sampling", {}).get("draws", shard.num_draws)
        _, got = shard.sample_draws(index)
        per_pos = np.add.reduceat(got, starts)
        if (counts > draws).any():
            t = int(np.argmax(counts > draws))
            return f"position {t} holds {int(counts[t])} distinct ids, more than sampling.draws {draws} in {MANIFEST}"
        if (got < 1).any() or (per_pos != draws).any():
            t = int(np.argmax(per_pos != draws)) if (per_pos != draws).any() else 0
            return f"position {t}'s draw counts do not sum to sampling.draws {draws} in {MANIFEST}"
        return ""
    if not np.isfinite(lp).all():
        return "a non-finite log-prob"
    if not ((res >= 0) & (res <= 1)).all():
        return "a residual outside [0, 1]"
    if tails is not None:
        problem = tail_problem(shard, counts, lp, res, tails, vocab)
        if problem:
            return problem
    trunc = manifest.get("truncation")
    if not trunc:
        return ""
    top_p, top_k = trunc.get("top_p", 1.0), trunc.get("top_k")
    lp = lp.astype(np.float64)
    last = lp[starts + counts - 1]
    if top_k is not None:
        over = np.flatnonzero(counts > top_k)
        # Beyond top_k only ids tied with the top_k-th (the entries are sorted by descending log-prob).
        untied = over[last[over] != lp[starts[over] + top_k - 1]]
        if untied.size:
            t = int(untied[0])
            return f"position {t} keeps {int(counts[t])} ids, more than truncation.top_k {top_k} in {MANIFEST} allows"
    cap = min(top_k if top_k is not None else vocab, vocab)
    slack = _MASS_SLACK + _MASS_SLACK_PER_ID * counts
    if top_p < 1.0:
        # Rounding to the qlog grid moves a log-prob by at most its step; fp16 only rounds down.
        grid = QLOG_STEP.get(shard.logprob_dtype, 0.0)
        above = np.add.reduceat(np.where(lp > np.repeat(last, counts), np.exp(lp), 0.0), starts)
        bad = np.flatnonzero(above > top_p * np.exp(grid) + slack)
        if bad.size:
            t = int(bad[0])
            return (f"position {t} keeps mass {above[t]:.4g} above its last kept id, more than truncation.top_p "
                    f"{top_p} in {MANIFEST} allows")
        short = np.flatnonzero((counts < cap) & (1.0 - res.astype(np.float64) < top_p - slack))
        if short.size:
            t = int(short[0])
            return (f"position {t} keeps {int(counts[t])} ids holding mass {1.0 - float(res[t]):.4g}, less than "
                    f"truncation.top_p {top_p} in {MANIFEST}, though truncation.top_k did not cut it")
    elif (counts < cap).any():
        t = int(np.argmax(counts < cap))
        what = f"truncation.top_k {top_k}" if top_k is not None else "no truncation (the whole vocabulary)"
        return f"position {t} keeps {int(counts[t])} ids, fewer than {what} in {MANIFEST} keeps at top_p 1"
    return ""


def tail_problem(shard, counts, lp, res, tails, vocab: int) -> str:
    """What a sample's tempered tails ``tails[s, T]`` (``log Σ_truncated p_i^(1/τ)`` for
    ``shard.tail_temperatures``) hold that no teacher distribution with these kept ids can give,
    in a phrase naming the position and τ ("" if nothing). Flat ``counts[s]``, ``lp[Σ counts]``
    (decoded), ``res[s]`` (decoded residuals).

    Each check is an inequality every exact tail satisfies, widened by the rounding of what is
    stored (the encoding's log-prob bound, the residual's dtype, the tail's float32); with n =
    ``vocab - count`` (at least the number of truncated ids), a = 1/τ, r the residual and p_last the
    last kept probability (every truncated p_i <= p_last: the truncation keeps the largest):

    * finite or -inf; -inf where nothing is truncated (n = 0); -inf elsewhere only if every
      truncated p_i^a underflowed float64, so r < n·e^(-745·τ);
    * tail <= log n + a·log p_last;
    * power means of the truncated p_i: for τ > 1, a·log r <= tail <= (1 - a)·log n + a·log r;
      for τ < 1 the same two bounds the other way round."""
    t = np.asarray(tails, dtype=np.float64)
    if np.isnan(t).any() or (t == np.inf).any():
        pos = int(np.argmax(np.isnan(t).any(-1) | (t == np.inf).any(-1)))
        return f"position {pos} has a NaN or +inf tempered tail"
    starts = entry_starts(counts)
    n = np.maximum(vocab - counts, 0).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_n = np.log(n)  # -inf where nothing can be truncated
    lp = np.asarray(lp, dtype=np.float64)
    last = lp[starts + counts - 1]
    rel, ab = _RESIDUAL_ERROR[shard.residual_dtype]
    r = np.asarray(res, dtype=np.float64)
    r_lo, r_hi = np.maximum(r - ab, 0.0) / (1 + rel), (r + ab) / (1 - rel)
    if shard.logprob_dtype in QLOG_STEP:
        # The grid's bound, plus the decoder's level log(1 - r̂) moving with the residual's rounding.
        with np.errstate(divide="ignore"):
            lp_err = QLOG_STEP[shard.logprob_dtype] + 1e-6 + np.where(
                r_hi < 1, (rel * r + ab) / np.maximum(1 - r_hi, 1e-300), np.inf)
    else:
        lp_err = np.abs(last) * (2**-10 if shard.logprob_dtype == "fp16" else 2**-24) + 2**-24
    with np.errstate(divide="ignore"):
        log_lo, log_hi = np.log(r_lo), np.log(r_hi)
    for j, tau in enumerate(shard.tail_temperatures):
        with np.errstate(invalid="ignore"):  # (1 - a)·log n + a·log r is NaN only where n = 0, checked apart
            problem = _tail_column_problem(tau, t[:, j], n, log_n, last, lp_err, r, r_lo, log_lo, log_hi, counts)
        if problem:
            return problem
    return ""


def _tail_column_problem(tau, col, n, log_n, last, lp_err, r, r_lo, log_lo, log_hi, counts) -> str:
    """:func:`tail_problem` for the tails at one τ, ``col[s]``."""
    a = 1.0 / tau
    finite = np.isfinite(col)
    slack = np.where(finite, np.abs(col), 0.0) * 2**-23 + 1e-6  # the tail's float32 rounding, float64 sums
    say = f"tempered tail at τ {tau:g}"
    bad = np.flatnonzero(finite & (n == 0))
    if bad.size:
        return f"position {int(bad[0])} keeps the whole vocabulary but has a finite {say}"
    bad = np.flatnonzero(~finite & (r_lo > n * np.exp(_LOG_TINY64 * tau)))
    if bad.size:
        p = int(bad[0])
        return f"position {p} has a {say} of -inf (nothing truncated) but residual {r[p]:.4g}"
    checks = (
        (col > log_n + a * (last + lp_err) + slack, "above what its last kept log-prob allows"),
        (col < (a * log_lo if tau > 1 else (1 - a) * log_n + a * log_lo) - slack, "below what its residual allows"),
        (col > (a * log_hi if tau < 1 else (1 - a) * log_n + a * log_hi) + slack, "above what its residual allows"),
    )
    for mask, what in checks:
        bad = np.flatnonzero(finite & (n > 0) & mask)
        if bad.size:
            p = int(bad[0])
            return f"position {p} has a {say} of {col[p]:.6g}, {what} (residual {r[p]:.4g}, {int(counts[p])} ids kept)"
    return ""


def run_dataset(config: str, overrides: Optional[list] = None):
    """The training ``GPTDataset`` of run file ``config``, built as training builds it (starts a
    one-process group if none is running)."""
    from megadistill.config import load_config
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.distributed import init_distributed

    cfg = load_config(config, overrides, world_size=1)
    init_distributed(cfg)
    return prepare_data(cfg)[1]
