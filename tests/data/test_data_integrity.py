"""Damaged data is found at start, named, and never trained on: the .bin/.idx structure, the
checksum manifest written at preprocess time, ``megadistill data verify``, and clean one-line
errors (exit 2) for bad inputs from ``preprocess`` and ``train``."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megadistill import cli
from megadistill.data import integrity as data_integrity
from megadistill.config import ConfigError, DataConfig, RunConfig
from megadistill.data.tokenizer import SentencePieceTokenizer
from megadistill.data.datasets import build_gpt_datasets
from megadistill.data.errors import DataError
from megadistill.preflight import preflight
from megadistill.testing import run_distributed
from tiny_runs import ROOT

EXTS = (".bin", ".idx", ".model", ".manifest.json")
HEADER = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)


@pytest.fixture
def copy(embedded_corpus, tmp_path):
    """A private copy of the corpus files (to damage), as its prefix."""
    prefix = tmp_path / "corpus"
    for ext in EXTS:
        shutil.copyfile(f"{embedded_corpus.prefix}{ext}", f"{prefix}{ext}")
    return prefix


def _counts(prefix) -> tuple[int, int]:
    s, d = struct.unpack("<QQ", Path(f"{prefix}.idx").read_bytes()[18:HEADER])
    return s, d


def _truncate(path, n):
    os.truncate(path, os.path.getsize(path) - n)


def _overwrite(path, offset, raw: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def _random_ids_within_vocab(prefix):
    """Same size, same structure, other tokens: only a checksum can tell."""
    ids = np.random.default_rng(0).integers(2, 2048, size=1000, dtype=np.uint16)
    _overwrite(f"{prefix}.bin", 4000, ids.tobytes())


def _corrupt_length(prefix):
    s, _ = _counts(prefix)
    _overwrite(f"{prefix}.idx", HEADER + 4 * (s // 2), struct.pack("<i", 7))


def _corrupt_pointer(prefix):
    s, _ = _counts(prefix)
    _overwrite(f"{prefix}.idx", HEADER + 4 * s + 8 * (s // 2), struct.pack("<q", 10**12))


def _corrupt_document_index(prefix):
    s, _ = _counts(prefix)
    _overwrite(f"{prefix}.idx", HEADER + 12 * s + 8 * 5, struct.pack("<q", 3))


def _corrupt_count(prefix):
    _overwrite(f"{prefix}.idx", 18, struct.pack("<Q", 10**6))


# name: (damage, the file the error names, found by the O(1) check preflight runs)
DAMAGE = {
    "bin cut by 100 bytes": (lambda p: _truncate(f"{p}.bin", 100), ".bin", True),
    "bin cut by 8000 bytes": (lambda p: _truncate(f"{p}.bin", 8000), ".bin", True),
    "bin with trailing bytes": (lambda p: open(f"{p}.bin", "ab").write(b"\0\0"), ".bin", True),
    "idx cut by 8 bytes": (lambda p: _truncate(f"{p}.idx", 8), ".idx", True),
    "idx sequence count": (_corrupt_count, ".idx", True),
    "idx mid-file length": (_corrupt_length, ".idx", False),
    "idx mid-file pointer": (_corrupt_pointer, ".idx", False),
    "idx mid-file document index": (_corrupt_document_index, ".idx", False),
}


def _names(message: str, path) -> bool:
    return str(path) in message


# --------------------------------------------------------------------------- structure


def test_intact_corpus_passes_every_check(embedded_corpus, copy):
    summary = data_integrity.check_index(copy)
    assert (summary.num_documents, summary.num_tokens, summary.dtype) == (79, embedded_corpus.num_tokens, np.uint16)
    report = data_integrity.verify(copy)
    assert report.manifest and report.ids_checked and set(report.hashed) == {".bin", ".idx", ".model"}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_structure_is_found_before_training(case, copy, tmp_path):
    damage, ext, quick = DAMAGE[case]
    damage(copy)
    named = f"{copy}{ext}"
    # When the datasets are built (every rank, every start) ...
    with pytest.raises(DataError) as err:
        build_gpt_datasets(copy, SentencePieceTokenizer(f"{copy}.model"), 32, "90,10,0", (10, 10), 1,
                           cache_dir=tmp_path / "cache")
    assert _names(str(err.value), named), str(err.value)
    assert "\n" not in str(err.value)
    # ... also without a manifest (data written by Megatron-LM's own tools) ...
    os.unlink(f"{copy}.manifest.json")
    with pytest.raises(DataError, match=re.escape(named)):
        data_integrity.check_index(copy)
    # ... and, for what a size check sees, already in preflight.
    cfg = RunConfig(data=DataConfig(data_prefix=str(copy), tokenizer_model=f"{copy}.model"))
    if quick:
        with pytest.raises(ConfigError, match=r"^data\.data_prefix: .*" + re.escape(named)):
            preflight(cfg)


def test_empty_index_is_named(copy):
    Path(f"{copy}.idx").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{copy}.idx is empty")):
        data_integrity.check_index(copy)


# --------------------------------------------------------------------------- manifest


def test_preprocess_writes_a_manifest(embedded_corpus):
    manifest = json.loads(Path(f"{embedded_corpus.prefix}.manifest.json").read_text())
    import hashlib

    for ext in (".bin", ".idx", ".model"):
        raw = Path(f"{embedded_corpus.prefix}{ext}").read_bytes()
        assert manifest["files"][ext] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert (manifest["num_documents"], manifest["num_tokens"], manifest["vocab_size"]) == (79, embedded_corpus.num_tokens, 2048)
    assert manifest["recipe"]["inputs"]["embedded_sha256"]


def test_tokens_changed_in_place_are_found_by_the_manifest(copy):
    _random_ids_within_vocab(copy)
    data_integrity.check_index(copy)  # the structure cannot tell
    for limit in (None, data_integrity.HASH_AT_START_BYTES):  # data verify, and start on small files
        with pytest.raises(DataError, match=re.escape(f"{copy}.bin does not match its manifest {copy}.manifest.json")):
            data_integrity.verify(copy, hash_limit=limit)
    # Above the start-up limit only the size is compared: a full check is `megadistill data verify`.
    report = data_integrity.verify(copy, hash_limit=100_000)  # .bin 260 KB, .model 31 KB, .idx 2 KB
    assert set(report.hashed) == {".idx", ".model"} and report.unhashed == [".bin"] and not report.ids_checked


def test_a_replaced_tokenizer_is_found_by_the_manifest(copy, tmp_path):
    shutil.copyfile(ROOT / "README.md", f"{copy}.model")
    with pytest.raises(DataError, match=re.escape(f"{copy}.model is")):
        data_integrity.verify(copy)


def test_a_damaged_manifest_is_named(copy):
    Path(f"{copy}.manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(f"{copy}.manifest.json is not a valid manifest")):
        data_integrity.verify(copy)


def test_token_ids_beyond_the_vocabulary_are_found(copy):
    os.unlink(f"{copy}.manifest.json")  # foreign data: no checksums, the ids are still checked
    _overwrite(f"{copy}.bin", 2 * 5000, struct.pack("<H", 4000))
    with pytest.raises(DataError, match=re.escape(f"{copy}.bin: token 5000 (document ") + r"\d+\) is id 4000, "
                       r"not below the vocabulary size 2048 of " + re.escape(f"{copy}.model")):
        data_integrity.verify(copy)


# --------------------------------------------------------------------------- megadistill data verify


def test_cli_data_verify(copy, capsys):
    assert cli.main(["data", "verify", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "79 documents" in out and "sha256 of .bin, .idx, .model match" in out and "below 2048" in out
    assert cli.main(["data", "verify", f"{copy}.bin"]) == 0  # a file name is taken as its prefix
    capsys.readouterr()
    _random_ids_within_vocab(copy)
    assert cli.main(["data", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"megadistill: error: {copy}.bin does not match") and "\n" not in err


@pytest.mark.parametrize("case", list(DAMAGE))
def test_cli_data_verify_names_the_damaged_file(case, copy, capsys):
    damage, ext, _ = DAMAGE[case]
    damage(copy)
    assert cli.main(["data", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{copy}{ext}" in err and "\n" not in err, err


def test_cli_data_verify_without_manifest_or_files(copy, tmp_path, capsys):
    os.unlink(f"{copy}.manifest.json")
    assert cli.main(["data", "verify", str(copy)]) == 0
    assert "no manifest" in capsys.readouterr().out
    assert cli.main(["data", "verify", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}.bin" in capsys.readouterr().err


# --------------------------------------------------------------------------- at start: prepare_data


def _prepare(cfg):
    from megadistill.data.datasets import prepare_data

    try:
        tok, train, valid, _ = prepare_data(cfg)
    except Exception as e:  # noqa: BLE001 - handed back to the test
        return type(e).__name__, str(e)
    return "ok", len(train)


def _data_cfg(tmp_path, **data) -> RunConfig:
    return RunConfig(output_dir=str(tmp_path / "run"), data=DataConfig(seq_length=32, micro_batch_size=4, global_batch_size=8, **data))


def test_start_refuses_tokens_changed_in_place(copy, tmp_path):
    cfg = _data_cfg(tmp_path, data_prefix=str(copy), tokenizer_model=f"{copy}.model")
    assert run_distributed(_prepare, 1, cfg)[0][0] == "ok"
    _random_ids_within_vocab(copy)
    kind, message = run_distributed(_prepare, 1, cfg)[0]
    assert kind == "DataError" and f"{copy}.bin does not match its manifest" in message


def test_start_rebuilds_a_damaged_run_corpus(tmp_path, embedded_corpus, capfd):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"document {i} about nothing much" for i in range(40)))
    cfg = _data_cfg(tmp_path, inputs=[str(txt)], tokenizer_model=str(embedded_corpus.tokenizer_model))
    assert run_distributed(_prepare, 1, cfg)[0][0] == "ok"
    prefix = tmp_path / "run" / "data" / "corpus"
    good = Path(f"{prefix}.bin").read_bytes()
    _overwrite(f"{prefix}.bin", 10, b"\x07\x00")
    capfd.readouterr()
    assert run_distributed(_prepare, 1, cfg)[0][0] == "ok"
    assert f"{prefix}.bin does not match its manifest" in capfd.readouterr().err  # said, not silent
    assert Path(f"{prefix}.bin").read_bytes() == good


def test_an_input_error_is_a_data_error_on_every_rank(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut\n')
    cfg = _data_cfg(tmp_path, inputs=[str(bad)], vocab_size=300)
    for kind, message in run_distributed(_prepare, 2, cfg):
        assert kind == "DataError" and message.startswith(f"{bad}, line 2: not valid JSON"), message


# --------------------------------------------------------------------------- input errors through the CLI


def _write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


CLI_INPUTS = {
    "empty": (lambda d: _write(d / "empty.txt", ""), "input file {path} is empty"),
    "binary": (lambda d: _write(d / "image.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256))), "{path}, line 1: not valid UTF-8"),
    "UTF-16 text": (lambda d: _write(d / "u16.txt", "hello\nworld\n".encode("utf-16-le")),
                    "{path}, line 1: contains NUL characters"),
    "latin-1 text": (lambda d: _write(d / "latin1.txt", "ok\ncaf\xe9\n".encode("latin-1")), "{path}, line 2: not valid UTF-8"),
    "not JSON": (lambda d: _write(d / "bad.jsonl", '{"text": "ok"}\n{"text": \n'), "{path}, line 2: not valid JSON"),
    "missing key": (lambda d: _write(d / "key.jsonl", '{"body": "x"}\n'), "{path}, line 1: no key 'text'"),
    "lone surrogate": (lambda d: _write(d / "sur.jsonl", '{"text": "ok"}\n{"text": "half \\ud83d"}\n'),
                       "{path}, line 2: 'text' is not valid Unicode"),
}


@pytest.mark.parametrize("case", list(CLI_INPUTS))
def test_preprocess_cli_input_errors_are_one_line(case, tmp_path, capsys):
    make, message = CLI_INPUTS[case]
    path = make(tmp_path)
    code = cli.main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "out" / "x"), "--vocab-size", "300"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("megadistill: error: " + message.format(path=path)) and "\n" not in err, err


def test_preprocess_cli_setting_errors_are_one_line(tmp_path, capsys):
    txt = _write(tmp_path / "a.txt", "a tiny corpus\n")
    for args, message in (
        (["--vocab-size", "100"], "vocab_size must be an integer >= 259"),
        (["--vocab-size", "5000"], "could not train a vocabulary of 5000"),
        (["--tokenizer-model", str(txt)], f"{txt} is not a sentencepiece model"),
    ):
        assert cli.main(["preprocess", "--input", str(txt), "--output-prefix", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("megadistill: error: ") and message in err and "\n" not in err, err


def test_train_cli_input_error_is_one_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n' * 3 + '{"txt": "typo"}\n')
    run = {"output_dir": str(tmp_path / "run"), "data": {"inputs": [str(bad)], "vocab_size": 300},
           "training": {"train_steps": 2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "megadistill", "train", str(path), "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"megadistill: error: {bad}, line 4: no key 'text' in the JSON object (keys: 'txt')" in r.stderr


# --------------------------------------------------------------------------- preflight


def test_preflight_says_an_input_is_a_directory(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("b.jsonl", "a.jsonl"):
        (folder / name).write_text('{"text": "x"}\n')
    cfg = RunConfig(data=DataConfig(inputs=[str(folder)]))
    with pytest.raises(ConfigError, match=re.escape(f"data.inputs: {folder} is a directory, not a file; list its files "
                                                    f"instead, e.g. {folder / 'a.jsonl'}, {folder / 'b.jsonl'}")):
        preflight(cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match=re.escape(f"data.inputs: file {empty} is empty")):
        preflight(RunConfig(data=DataConfig(inputs=[str(empty)])))


def test_preflight_says_a_prefix_or_tokenizer_is_a_directory(copy, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"data.data_prefix: {tmp_path} is a directory; give the prefix "
                                                    f"of the .bin/.idx files, e.g. {copy}")):
        preflight(RunConfig(data=DataConfig(data_prefix=str(tmp_path), tokenizer_model=f"{copy}.model")))
    with pytest.raises(ConfigError, match=re.escape(f"data.tokenizer_model: {tmp_path} is a directory, not a sentencepiece .model file")):
        preflight(RunConfig(data=DataConfig(tokenizer_model=str(tmp_path))))
    preflight(RunConfig(data=DataConfig(data_prefix=str(copy), tokenizer_model=f"{copy}.model")))  # intact: passes
