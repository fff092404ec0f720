"""``megadistill store info`` and ``megadistill store verify``: what a store holds, and a full check."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from megadistill.store.format import StoreError
from megadistill.store.reader import StoreReader


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
    ]


def _settings(m: dict) -> list[str]:
    enc = m["encoding"]
    zstd = ", zstd-compressed sections" if enc.get("compression") == "zstd" else ""
    if m["kind"] == "rskd":
        smp = m["sampling"]
        return [f"sampling: RS-KD, {smp['draws']} draws per position from the τ = 1 distribution (seed {smp['seed']}); "
                "targets are the empirical distributions count/draws",
                f"encoding: vocab {enc['vocab_size']} -> {enc['id_bits']}-bit ids, {enc['draw_dtype']} draw counts{zstd}"]
    trunc = m["truncation"]
    lp, res = enc["logprob_dtype"], enc.get("residual_dtype", enc["logprob_dtype"])
    what = f"{lp} log-probs and residuals" if lp == res else f"{lp} log-probs, {res} residuals"
    return [f"truncation: top_p={trunc['top_p']} top_k={trunc['top_k']} (ties with the last kept id kept)",
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
    """Check every shard's sha256 and decode every sample; with ``dataset`` (the run's training
    ``GPTDataset``), check each sample's token hash against it. Raises ``StoreError`` at the first
    problem; returns a summary."""
    from megadistill.store.format import sample_hash

    reader = StoreReader(path, verify=True)
    m = reader.manifest
    for i, entry in enumerate(m["shards"]):
        sh = reader.shard(i)
        if (sh.first_sample, sh.num_samples) != (entry["first_sample"], entry["num_samples"]):
            raise StoreError(f"shard {entry['file']} holds samples {sh.first_sample}.. ({sh.num_samples}), "
                             f"the manifest says {entry['first_sample']}.. ({entry['num_samples']})")
        for j in range(sh.first_sample, sh.first_sample + sh.num_samples):
            ids, lp, res = sh.sample(j)
            valid = ids >= 0
            if not valid.any(-1).all() or (ids >= m["encoding"]["vocab_size"]).any() or not np.isfinite(lp[valid]).all() \
                    or not ((res >= 0) & (res <= 1)).all():
                raise StoreError(f"shard {entry['file']}, sample {j}: ids out of range, a position without ids, "
                                 "non-finite log-probs or a residual outside [0, 1]")
            if dataset is not None:
                s = dataset[j]
                if sample_hash(s["tokens"], s["labels"]) != bytes(sh.hashes[j - sh.first_sample]):
                    raise StoreError(f"shard {entry['file']}, sample {j}: the dataset's tokens differ from the store's")
    checked = " and against the run's dataset" if dataset is not None else ""
    return [f"store {reader.path}: {len(m['shards'])} shards, {m['num_samples']} samples: checksums and contents OK{checked}"]


def run_dataset(config: str, overrides: Optional[list] = None):
    """The training ``GPTDataset`` of run file ``config``, built as training builds it (starts a
    one-process group if none is running)."""
    from megadistill.config import load_config
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.distributed import init_distributed

    cfg = load_config(config, overrides, world_size=1)
    init_distributed(cfg)
    return prepare_data(cfg)[1]
