"""``megadistill store info`` and ``megadistill store verify``: what a store holds, and a full check."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from megadistill.store.format import StoreError
from megadistill.store.reader import StoreReader


def info(path: str | Path) -> list[str]:
    """Lines describing a finished store: settings, size, bytes/token, ids/position, coverage."""
    reader = StoreReader(path, verify=False)
    m = reader.manifest
    ident, enc = m["identity"], m["encoding"]
    seq = ident["dataset"]["seq_length"]
    tokens = m["num_samples"] * seq
    entries = 0
    for i, _ in enumerate(m["shards"]):
        sh = reader.shard(i)
        entries += int(sh.entry_offsets[-1])
    ds = ident["dataset"]
    return [
        f"store {reader.path}: format {m['format_version']}, {m['kind']}",
        *_settings(m),
        f"teacher: {ident['teacher']['path']} ({ident['teacher']['num_files']} files, sha256 {ident['teacher']['files_sha256'][:12]}…)",
        f"tokenizer sha256 {ident['tokenizer_sha256'][:12]}…",
        f"dataset: {ds.get('data_prefix') or ds.get('inputs')}, {ds['num_documents']} documents, seq_length {seq}, "
        f"split {ds['split']}, seed {ds['seed']}",
        f"coverage: samples 0..{m['num_samples'] - 1} ({tokens} tokens) in {len(m['shards'])} shards of {m['samples_per_shard']}",
        f"size: {m['total_bytes']} bytes = {m['total_bytes'] / max(tokens, 1):.1f} bytes/token; "
        f"{entries / max(tokens, 1):.2f} ids/position on average",
    ]


def _settings(m: dict) -> list[str]:
    enc = m["encoding"]
    if m["kind"] == "rskd":
        smp = m["sampling"]
        return [f"sampling: RS-KD, {smp['draws']} draws per position from the τ = 1 distribution (seed {smp['seed']}); "
                "targets are the empirical distributions count/draws",
                f"encoding: vocab {enc['vocab_size']} -> {enc['id_bits']}-bit ids, {enc['draw_dtype']} draw counts"]
    trunc = m["truncation"]
    return [f"truncation: top_p={trunc['top_p']} top_k={trunc['top_k']} (ties with the last kept id kept)",
            f"encoding: vocab {enc['vocab_size']} -> {enc['id_bits']}-bit ids, {enc['logprob_dtype']} log-probs and residuals"]


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
            ids, lp, _ = sh.sample(j)
            valid = ids >= 0
            if not valid.any(-1).all() or (ids >= m["encoding"]["vocab_size"]).any() or not np.isfinite(lp[valid]).all():
                raise StoreError(f"shard {entry['file']}, sample {j}: ids out of range, a position without ids, or non-finite log-probs")
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
    from megadistill.datasets import prepare_data
    from megadistill.train import init_distributed

    cfg = load_config(config, overrides, world_size=1, preflight=False)
    init_distributed(cfg)
    return prepare_data(cfg)[1]
