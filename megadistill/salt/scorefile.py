"""The SALT_DS score directory (``data_selection.scores``), written by ``megadistill score-data``.

* ``manifest.json`` — written last, atomically: what was scored (teacher checkpoint and model,
  tokenizer sha256, dataset identity, ``top_k``, the number of samples) and each array file's
  size and sha256. A directory without it is incomplete.
* ``scores.npy`` — ``[N]`` float64, sample ``i``'s median teacher loss over its learnable tokens
  (NaN: none learnable). ``N = training.train_steps × data.global_batch_size``, indexed by global
  sample index.
* ``learnable_tokens.npy`` — ``[N]`` int32, how many of sample ``i``'s tokens are learnable.
  ``data_selection.min_learnable_tokens`` is applied to it at selection time, so changing that
  threshold needs no rescoring.
* ``sample_hashes.npy`` — ``[N, 16]`` uint8, ``megadistill.store.format.sample_hash`` of each
  sample's tokens and labels (the data a score belongs to).
* ``histogram.png`` — the scores with the selection band of the config last given (redrawn, not
  checksummed).
* while scoring: ``plan.json`` and ``part-NNNNNN.npz`` (samples ``[N·P, (N+1)·P)``), each written
  atomically; a killed run resumes from the parts that decode.

Files are written with ``megadistill.store.writer.write_atomic``; identities come from
``megadistill.checkpoint_identity.checkpoint_identity`` and ``megadistill.store.format.sample_hash``,
so a score file and a logits store made for one run agree about what "the same run" means.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megadistill.config import ConfigError, data_seed
from megadistill.store.format import bytes_sha256, dump_json, load_json
from megadistill.store.writer import write_atomic

FORMAT = "megadistill-salt-scores"
FORMAT_VERSION = 1
MANIFEST, PLAN, HISTOGRAM = "manifest.json", "plan.json", "histogram.png"
ARRAYS = {"scores": "scores.npy", "learnable_tokens": "learnable_tokens.npy", "sample_hashes": "sample_hashes.npy"}
DEFAULT_SAMPLES_PER_PART = 1024
STATISTIC = "median cross entropy of the true next token over the tokens whose target is in the teacher's top_k (ties kept)"


class ScoreFileError(ConfigError):
    """A score directory that cannot be used: missing, incomplete, corrupt, or made for another run."""


def part_name(index: int) -> str:
    return f"part-{index:06d}.npz"


def part_ranges(num_samples: int, per_part: int) -> list[tuple[int, int]]:
    """``[(first_sample, count)]`` of every part of ``num_samples`` samples."""
    return [(a, min(per_part, num_samples - a)) for a in range(0, num_samples, per_part)]


def data_prefix(cfg) -> Path:
    """The ``.bin/.idx`` prefix run ``cfg`` trains on (``data.data_prefix``, or the corpus
    ``megadistill.datasets.prepare_data`` preprocesses into the run's directory)."""
    return Path(cfg.data.data_prefix) if cfg.data.data_prefix else Path(cfg.output_dir) / "data" / "corpus"


def tokenizer_path(cfg) -> Path:
    """The tokenizer file run ``cfg`` trains with (as ``prepare_data`` resolves it: a Hugging Face
    tokenizer directory's tokenizer.json), whose sha256 is the tokenizer's identity."""
    if cfg.data.tokenizer_model and getattr(cfg.data, "tokenizer_type", "sentencepiece") == "huggingface":
        from megadistill.data.tokenizer import tokenizer_file

        return tokenizer_file(cfg.data.tokenizer_model, "huggingface")
    return Path(cfg.data.tokenizer_model) if cfg.data.tokenizer_model else Path(str(data_prefix(cfg)) + ".model")


def dataset_identity(cfg, train_ds=None) -> dict:
    """What defines run ``cfg``'s training samples: the data files (the ``.idx``'s sha256, which
    changes with any document's length or count), split, seed and sequence length. With the built
    ``train_ds`` (a GPTDataset), also its number of documents, as the logits store records it."""
    from megadistill.hashing import file_sha256

    d = cfg.data
    prefix = data_prefix(cfg)
    idx = Path(str(prefix) + ".idx")
    if not idx.is_file():
        raise ScoreFileError(f"the run's data {idx} does not exist (data.data_prefix, or data.inputs preprocessed "
                             "into output_dir by megadistill score-data or train)")
    ident = {
        "data_prefix": str(Path(d.data_prefix).resolve()) if d.data_prefix else None,
        "inputs": list(d.inputs) if d.inputs else None,
        "idx_sha256": file_sha256(idx),
        "seed": data_seed(cfg), "seq_length": d.seq_length, "split": d.split,
    }
    if d.train_samples is not None:  # absent otherwise, as in score files written before the key existed
        ident["train_samples"] = d.train_samples
    if train_ds is not None:
        ident["num_documents"] = int(len(train_ds.dataset.sequence_lengths))
    return ident


def teacher_identity(cfg, ckpt: Path) -> dict:
    """The scoring teacher: its checkpoint files' sha256 (``checkpoint_identity``) and ``teacher.model``."""
    from megadistill.config import to_dict
    from megadistill.checkpoint_identity import checkpoint_identity

    return {**checkpoint_identity(Path(ckpt)), "model": to_dict(cfg.teacher.model)}


def make_plan(cfg, ckpt: Path, tokenizer_sha256: str, dataset: dict, samples_per_part: int) -> dict:
    """The plan of a scoring run (the manifest less its file list)."""
    sel = cfg.data_selection
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": {"teacher": teacher_identity(cfg, ckpt), "tokenizer_sha256": tokenizer_sha256, "dataset": dataset},
        "scoring": {"top_k": sel.top_k, "statistic": STATISTIC,
                    # Recorded for the summary; selection applies the run's own threshold.
                    "min_learnable_tokens": sel.min_learnable_tokens},
        "num_samples": cfg.training.train_steps * cfg.data.global_batch_size,
        "samples_per_part": samples_per_part,
    }


def _differs(found: dict, plan: dict, keys) -> list[str]:
    return sorted(k for k in keys if found.get(k) != plan.get(k))


def begin(out: Path, plan: dict) -> Optional[list[int]]:
    """Prepare ``out`` for scoring per ``plan``: ``None`` if it already holds the finished scores of
    this plan, else the parts already written (resume). A directory made for another run is refused."""
    out.mkdir(parents=True, exist_ok=True)
    same = ("format", "format_version", "identity", "num_samples")
    manifest = load_json(out / MANIFEST)
    if manifest is not None:
        diff = _differs(manifest, plan, same) + (["scoring.top_k"] if manifest.get("scoring", {}).get("top_k") != plan["scoring"]["top_k"] else [])
        if diff:
            raise ScoreFileError(f"data_selection.scores {out} holds scores made for another run (differs in: "
                                 f"{', '.join(diff)}); give another data_selection.scores or remove that directory")
        _remove_parts(out)  # left by a scoring killed between its manifest and its clean-up
        return None
    found = load_json(out / PLAN)
    if found is not None:
        diff = _differs(found, plan, plan)
        if diff:
            raise ScoreFileError(f"data_selection.scores {out} holds an unfinished scoring of another run (differs in: "
                                 f"{', '.join(diff)}); give another data_selection.scores or remove that directory")
    else:
        write_atomic(out / PLAN, dump_json(plan))
    return sorted(finished_parts(out, plan))


def _encode(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_part(out: Path, index: int, first: int, scores: np.ndarray, counts: np.ndarray, hashes: list[bytes]) -> None:
    """Write part ``index``: ``scores[n]``, ``counts[n]`` and the ``n`` sample hashes of samples
    ``first .. first+n-1``."""
    write_atomic(out / part_name(index), _encode(
        first=np.int64(first), scores=np.asarray(scores, np.float64), counts=np.asarray(counts, np.int32),
        hashes=np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), -1)))


def _read_part(path: Path, first: int, count: int) -> Optional[dict]:
    """Part ``path``'s arrays if it decodes (zip CRCs, shapes) for samples ``first .. first+count-1``."""
    try:
        with np.load(path) as z:
            part = {k: z[k] for k in ("first", "scores", "counts", "hashes")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if int(part["first"]) != first or part["scores"].shape != (count,) or part["counts"].shape != (count,) \
            or part["hashes"].shape != (count, 16):
        return None
    return part


def finished_parts(out: Path, plan: dict) -> set[int]:
    """Indices of the parts already written for ``plan``; a damaged one is left out, to be redone."""
    ranges = part_ranges(plan["num_samples"], plan["samples_per_part"])
    return {i for i, (a, n) in enumerate(ranges) if (out / part_name(i)).is_file() and _read_part(out / part_name(i), a, n)}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def finish(out: Path, plan: dict, before_manifest: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> dict:
    """Join the parts into the array files, call ``before_manifest(scores, learnable_tokens)`` (the
    histogram), write ``manifest.json`` (last) and remove the parts and the plan. Returns the manifest."""
    ranges = part_ranges(plan["num_samples"], plan["samples_per_part"])
    parts = []
    for i, (a, n) in enumerate(ranges):
        part = _read_part(out / part_name(i), a, n)
        if part is None:
            raise ScoreFileError(f"part {out / part_name(i)} is missing or damaged: the scoring did not finish")
        parts.append(part)
    arrays = {
        "scores": np.concatenate([p["scores"] for p in parts]).astype("<f8"),
        "learnable_tokens": np.concatenate([p["counts"] for p in parts]).astype("<i4"),
        "sample_hashes": np.concatenate([p["hashes"] for p in parts]).astype(np.uint8),
    }
    files = {}
    for key, name in ARRAYS.items():
        data = _npy(arrays[key])
        write_atomic(out / name, data)
        files[key] = {"file": name, "bytes": len(data), "sha256": bytes_sha256(data)}
    s = arrays["scores"]
    finite = s[np.isfinite(s)]
    summary = {"samples": int(s.size), "with_learnable_tokens": int(finite.size),
               "mean_learnable_tokens": float(arrays["learnable_tokens"].mean()) if s.size else 0.0,
               "score_quantiles": {str(q): float(np.quantile(finite, q)) for q in (0.0, 0.25, 0.5, 0.75, 1.0)} if finite.size else {}}
    manifest = {**plan, "files": files, "summary": summary}
    if before_manifest is not None:
        before_manifest(arrays["scores"], arrays["learnable_tokens"])
    write_atomic(out / MANIFEST, dump_json(manifest))
    _remove_parts(out)
    return manifest


def _remove_parts(out: Path) -> None:
    for p in out.glob("part-*.npz"):
        p.unlink(missing_ok=True)
    (out / PLAN).unlink(missing_ok=True)


class ScoreFile:
    """A finished, verified score directory: ``manifest``, ``scores[N]``, ``learnable_tokens[N]``,
    ``sample_hashes[N, 16]``. Raises ``ScoreFileError`` naming the file for a missing, truncated or
    altered file."""

    def __init__(self, path: str | Path) -> None:
        from megadistill.hashing import file_sha256

        self.path = Path(path)
        try:
            manifest = load_json(self.path / MANIFEST)
        except ValueError as e:  # StoreError: not readable JSON
            raise ScoreFileError(f"data_selection.scores: {e}") from e
        if manifest is None:
            hint = " (a scoring is in progress or was killed: run megadistill score-data again)" \
                if (self.path / PLAN).is_file() else " (write it with megadistill score-data run.yaml)"
            what = "does not exist" if not self.path.exists() else f"has no {MANIFEST}"
            raise ScoreFileError(f"data_selection.scores {self.path} {what}{hint}")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ScoreFileError(f"data_selection.scores {self.path}: not a version-{FORMAT_VERSION} {FORMAT} directory "
                                 f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})")
        for key in ("identity", "scoring", "num_samples", "files"):
            if key not in manifest:
                raise ScoreFileError(f"data_selection.scores {self.path}: manifest lacks {key!r}")
        self.manifest = manifest
        n = int(manifest["num_samples"])
        arrays = {}
        for key, name in ARRAYS.items():
            entry = manifest["files"].get(key)
            f = self.path / name
            if entry is None or not f.is_file():
                raise ScoreFileError(f"data_selection.scores {self.path}: {name} is missing")
            size = f.stat().st_size
            if size != entry["bytes"] or file_sha256(f) != entry["sha256"]:
                raise ScoreFileError(
                    f"data_selection.scores {self.path}: {name} fails its checksum ({size} bytes, manifest "
                    f"records {entry['bytes']}; sha256 differs): the file is corrupt or was rewritten, score again")
            # Memory-mapped: at 10^8 samples the hashes alone are 1.6 GB, of which a run reads a few.
            arrays[key] = np.load(f, mmap_mode="r", allow_pickle=False)
        shapes = {"scores": (n,), "learnable_tokens": (n,), "sample_hashes": (n, 16)}
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise ScoreFileError(f"data_selection.scores {self.path}: {ARRAYS[key]} has shape {arrays[key].shape}, "
                                     f"expected {shape}")
        self.scores = arrays["scores"]
        self.learnable_tokens = arrays["learnable_tokens"]
        self.sample_hashes = arrays["sample_hashes"]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])


def run_mismatches(manifest: dict, cfg, teacher: Optional[dict], tokenizer_sha256: Optional[str],
                   dataset: Optional[dict]) -> list[str]:
    """How run ``cfg`` (its teacher identity, tokenizer sha256 and dataset identity, each None =
    not checked) disagrees with the run the scores were made for; one message per problem."""
    ident, problems = manifest["identity"], []
    if teacher is not None:
        t = ident.get("teacher", {})
        if t.get("files_sha256") != teacher["files_sha256"]:
            problems.append(f"teacher.checkpoint {teacher['path']} is not the teacher that scored the data "
                            f"({t.get('path')}; the checkpoint files differ)")
        if t.get("model") != teacher["model"]:
            problems.append("teacher.model differs from the scoring teacher's architecture")
    if tokenizer_sha256 is not None and ident.get("tokenizer_sha256") != tokenizer_sha256:
        problems.append("the run's tokenizer (data.tokenizer_model) is not the one the data was scored with")
    if dataset is not None:
        found = ident.get("dataset", {})
        names = {"seed": "data.seed (or training.seed)", "seq_length": "data.seq_length", "split": "data.split",
                 "data_prefix": "data.data_prefix", "inputs": "data.inputs", "idx_sha256": "the data's .idx file",
                 "train_samples": "data.train_samples"}
        for key, where in names.items():
            if found.get(key) != dataset.get(key):
                problems.append(f"{where} is {dataset.get(key)!r} but the data was scored with {found.get(key)!r}")
    needed = cfg.training.train_steps * cfg.data.global_batch_size
    if cfg.data.train_samples is not None and (dataset is None or found.get("train_samples") == cfg.data.train_samples):
        # One sample order (checked above): a shorter run reads a prefix of the scored samples.
        if int(manifest["num_samples"]) < needed:
            problems.append(f"the run trains on {needed} samples but only {manifest['num_samples']} were scored")
    elif int(manifest["num_samples"]) != needed:
        problems.append(
            f"the run trains on {needed} samples (training.train_steps x data.global_batch_size) but "
            f"{manifest['num_samples']} were scored (the sample order depends on the number of samples: score again)")
    top_k = manifest["scoring"].get("top_k")
    if top_k != cfg.data_selection.top_k:
        problems.append(f"data_selection.top_k is {cfg.data_selection.top_k} but the data was scored with top_k={top_k}")
    return problems
