"""What a recorded store says about itself (``record_logits:``): its plan -- the manifest without
``shards`` / ``recording`` -- in the keys ``precompute-logits`` writes, so the two kinds of store
are read and compared alike.

"Teacher checkpoint identity" for a recorded store (``identity.teacher``): the recording run
itself — ``recorded_by`` (run name, resolved output directory, sha256 of its config's
resume-invariant settings plus ``record_logits``, backend) and ``steps`` (the step range and the
rule by which sample ``i`` is seen in step ``i // global_batch_size``), ``model`` (its
architecture) and ``path`` (its checkpoint directory). The manifest's ``recording`` key, added by
the recorder at the end of the run, holds the final checkpoint and the sha256 of its completion
marker (which holds every file's sha256): the weights after the last step, which saw no recorded
sample.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megadistill.store.codec import RESIDUAL_DTYPES, count_dtype, id_bits
from megadistill.store.format import FORMAT_VERSION
from megadistill.store.temperatures import store_temperatures

SAMPLING_METHOD = "inverse CDF over the global vocabulary, u = splitmix64(seed, sample, position, draw)"


def _config_sha256(cfg) -> str:
    """sha256 of the settings that fix the run's trajectory (the resume invariants) and of the
    recording's own but its ``store``: a resumed run with the same ones continues the same recording."""
    from megadistill.config import to_dict
    from megadistill.config import RESUME_INVARIANTS

    tree = to_dict(cfg)
    picked = {}
    for key in tuple(RESUME_INVARIANTS) + ("record_logits",):
        node = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    # Where the store lives is not a setting of the recording (a store may be moved).
    picked["record_logits"] = {k: v for k, v in picked["record_logits"].items() if k != "store"}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()


def data_files(cfg) -> tuple[str, str]:
    """``(data prefix, tokenizer model)`` the run trains on (where ``prepare_data`` puts them)."""
    prefix = cfg.data.data_prefix or str(Path(cfg.output_dir) / "data" / "corpus")
    if cfg.data.tokenizer_model and cfg.data.tokenizer_type == "huggingface":
        from megadistill.data.tokenizer import tokenizer_file

        return prefix, str(tokenizer_file(cfg.data.tokenizer_model, "huggingface"))  # its tokenizer.json
    return prefix, cfg.data.tokenizer_model or prefix + ".model"


def dataset_identity(cfg) -> dict:
    """The store's ``identity.dataset`` for run ``cfg`` (the keys ``precompute-logits`` writes)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megadistill.config import data_seed

    d = cfg.data
    prefix, _ = data_files(cfg)
    return {
        "data_prefix": str(Path(d.data_prefix).resolve()) if d.data_prefix else None,
        "inputs": list(d.inputs) if d.inputs else None,
        "num_documents": int(len(IndexedDataset(prefix).sequence_lengths)),
        "seed": data_seed(cfg), "seq_length": d.seq_length, "split": d.split,
    }


def recorded_temperatures(cfg) -> tuple[float, ...]:
    """The sorted temperatures a recorded store is made for (``record_logits.temperatures``; top-p-k
    ones always include 1), as ``precompute-logits --temperatures`` would make them."""
    r = cfg.record_logits
    return store_temperatures(r.kind, r.temperatures, (), "ghost", "record_logits.temperatures")


def recording_plan(cfg, vocab_size: int, tokenizer_sha256: str, dataset: dict) -> dict:
    """The store's plan (its manifest without ``shards``/``recording``) for recording run ``cfg``."""
    from megadistill.config import to_dict

    # The same settings, in the same keys, as precompute-logits records (tests compare the two).
    r = cfg.record_logits
    temps = recorded_temperatures(cfg)
    if r.kind == "rskd":
        how = {"sampling": {"draws": r.draws, "seed": cfg.training.seed, "temperature": temps[0], "method": SAMPLING_METHOD}}
        enc = {"vocab_size": vocab_size, "id_bits": id_bits(vocab_size), "draw_dtype": count_dtype(r.draws).str,
               "ids_per_position": "variable (distinct ids drawn, <= draws)", "compression": r.compression}
    else:
        how = {"truncation": {"top_p": r.top_p, "top_k": r.top_k, "ties": "kept", "temperatures": list(temps)}}
        enc = {"vocab_size": vocab_size, "id_bits": id_bits(vocab_size), "logprob_dtype": r.logprob_dtype,
               "residual_dtype": RESIDUAL_DTYPES[r.logprob_dtype], "ids_per_position": "variable (per-position counts)",
               "compression": r.compression}
    out = Path(cfg.output_dir).resolve()
    g, steps = cfg.data.global_batch_size, cfg.training.train_steps
    teacher = {
        "path": str(out / "checkpoints"),
        "model": to_dict(cfg.model),
        "recorded_by": {"name": cfg.name, "output_dir": str(out), "config_sha256": _config_sha256(cfg),
                        "backend": cfg.optimizer.backend},
        "steps": {"first": 0, "last": steps - 1, "global_batch_size": g,
                  "seen_at": "sample i: the training forward of step i // global_batch_size, with the weights "
                             "after that many optimizer steps"},
    }
    return {
        "format_version": FORMAT_VERSION,
        "kind": r.kind,
        **how,
        "encoding": enc,
        "identity": {"teacher": teacher, "tokenizer_sha256": tokenizer_sha256, "dataset": dataset},
        "num_samples": steps * g,
        "samples_per_shard": r.samples_per_shard,
    }
