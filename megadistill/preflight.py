"""Checks of a run config that need its files or the machine: data files, tokenizer, teacher
checkpoint (its vocabulary and shape), Transformer Engine.

``megadistill.config.validate`` checks the config alone and can run anywhere (``load_config``
calls it); :func:`preflight` runs where the job will run, before any process group starts (the
commands call it after loading the config), so a missing file or a mismatched teacher fails in
seconds rather than after Megatron started.
Every error is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

from pathlib import Path

from megadistill.checkpoint_dir import is_complete, latest_checkpoint, read_marker
from megadistill.checkpoint_identity import resolve_teacher_checkpoint
from megadistill.config import CHECKPOINT_MODEL_PREFIX, ConfigError, ModelConfig, RunConfig, run_vocab_size
from megadistill.data.errors import DataError
from megadistill.hashing import file_sha256
from megadistill.schedules import kd_ends_at


def preflight(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` for the first problem found in the files and checkpoints ``cfg`` names."""
    _check_transformer_engine(cfg)
    _check_deepspeed_config(cfg)
    _check_data_files(cfg)
    _check_teacher(cfg)
    _check_store(cfg)
    _check_scores(cfg)


def check_teacher_job(cfg: RunConfig, output_key: str, output_what: str) -> None:
    """The checks of a job that runs the teacher alone over the training data and writes
    ``output_key`` (``megadistill precompute-logits``, ``megadistill score-data``): the full
    :func:`preflight` would demand the very output the job is about to write."""
    from dataclasses import replace

    section, name = output_key.split(".")
    if not getattr(getattr(cfg, section), name):
        raise ConfigError(f"{output_key} is required: the directory to write {output_what} to")
    if not cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is required: the teacher this job runs")
    _check_transformer_engine(cfg)
    _check_data_files(cfg)
    _check_teacher(replace(cfg, teacher=replace(cfg.teacher, mode="online")))


def _transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _check_transformer_engine(cfg: RunConfig) -> None:
    models = [("model", cfg.model)] + ([("teacher.model", cfg.teacher.model)] if cfg.teacher.mode == "online" else [])
    for key, m in models:
        if m.transformer_impl == "transformer_engine":
            from megadistill.megatron.gpt import use_transformer_engine

            try:
                use_transformer_engine(m, key)
            except ValueError as e:
                raise ConfigError(str(e)) from e
    if cfg.parallel.sequence_parallel and not _transformer_engine_available():
        raise ConfigError(
            "parallel.sequence_parallel needs Transformer Engine (its LayerNorm); it is not installed "
            "here: set parallel.sequence_parallel=false"
        )


def _check_deepspeed_config(cfg: RunConfig) -> None:
    """optimizer.backend=deepspeed: the DeepSpeed config the run generates passes DeepSpeed's own
    config classes (an unknown or mistyped key of deepspeed.config would otherwise stop
    ``deepspeed.initialize`` after the process groups started). Imports DeepSpeed, on a machine
    without CUDA as the backend does (CPU accelerator, no JIT-built op)."""
    if cfg.optimizer.backend != "deepspeed":
        return
    from megadistill.config.deepspeed import check_with_deepspeed
    from megadistill.deepspeed.env import configure_accelerator

    configure_accelerator()
    check_with_deepspeed(cfg)


def _check_data_files(cfg: RunConfig) -> None:
    """The data files exist and are files; a given ``.bin/.idx`` passes the checks that cost a few
    reads whatever its size (``data_integrity.quick_check``: truncation, mismatched sizes)."""
    d = cfg.data
    for f in d.inputs or []:
        p = Path(f)
        if p.is_dir():
            # The suffixes megadistill.data reads (TEXT_SUFFIXES, JSONL_SUFFIXES).
            found = sorted(str(c) for c in p.iterdir() if c.suffix in (".txt", ".jsonl") and c.is_file())
            hint = " (it holds no .txt or .jsonl file)"
            if found:
                hint = f", e.g. {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
            raise ConfigError(f"data.inputs: {f} is a directory, not a file; list its files instead{hint}")
        if not p.is_file():
            raise ConfigError(f"data.inputs: file {f} does not exist")
        if p.stat().st_size == 0:
            raise ConfigError(f"data.inputs: file {f} is empty")
    if d.data_prefix is not None:
        p = Path(d.data_prefix)
        if p.is_dir():
            found = sorted(str(c.with_suffix("")) for c in p.glob("*.idx"))
            hint = f", e.g. {found[0]}" if found else ""
            raise ConfigError(f"data.data_prefix: {p} is a directory; give the prefix of the .bin/.idx files{hint}")
        for ext in (".bin", ".idx"):
            if not Path(d.data_prefix + ext).is_file():
                raise ConfigError(f"data.data_prefix: {d.data_prefix}{ext} does not exist")
        from megadistill.data.integrity import quick_check

        try:
            quick_check(d.data_prefix)
        except DataError as e:
            raise ConfigError(f"data.data_prefix: {e}") from e
    if d.tokenizer_model is not None and d.tokenizer_type == "huggingface":
        from megadistill.data.tokenizer import tokenizer_file

        try:
            tokenizer_file(d.tokenizer_model, d.tokenizer_type)
        except (DataError, FileNotFoundError) as e:
            raise ConfigError(f"data.tokenizer_model (data.tokenizer_type huggingface): {e}") from e
    elif d.tokenizer_model is not None:
        if Path(d.tokenizer_model).is_dir():
            hint = (" (it holds a tokenizer.json: set data.tokenizer_type huggingface)"
                    if (Path(d.tokenizer_model) / "tokenizer.json").is_file() else "")
            raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} is a directory, not a sentencepiece .model file{hint}")
        if not Path(d.tokenizer_model).is_file():
            raise ConfigError(f"data.tokenizer_model: file {d.tokenizer_model} does not exist")


def _resumes_after_kd(cfg: RunConfig) -> bool:
    """Whether the run resumes at or after the step its KD phase ends (SALT), so that it needs no
    teacher checkpoint (a guess from the newest complete checkpoint; ``resume.decide`` settles it)."""
    end = kd_ends_at(cfg.kd.alpha, cfg.training.train_steps)
    resume = cfg.checkpoint.resume
    if end is None or resume == "none":
        return False
    path = latest_checkpoint(Path(cfg.output_dir) / "checkpoints") if resume == "auto" else Path(resume)
    try:
        return path is not None and int(read_marker(path).get("step", 0)) >= end
    except (OSError, ValueError):
        return False


def _check_teacher(cfg: RunConfig) -> None:
    t = cfg.teacher
    if t.mode != "online" or _resumes_after_kd(cfg):
        return
    if t.checkpoint is None:
        raise ConfigError("teacher.checkpoint is required for teacher.mode=online (a distributed checkpoint directory)")
    ckpt = resolve_teacher_checkpoint(t.checkpoint)
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megadistill.megatron.teacher import check_teacher_vocab, checkpoint_vocab_size, teacher_vocab_size

    # Its files are verified by checksum once the ranks exist (resume.decide), shared among them.
    backend = read_marker(ckpt).get("backend", "megatron") if is_complete(ckpt) else "megatron"
    if backend != "megatron":
        raise ConfigError(
            f"teacher.checkpoint {ckpt} was written by the {backend} backend; a teacher loads from a "
            "megatron-core distributed checkpoint (train the teacher with optimizer.backend=megatron)"
        )
    try:
        teacher_vocab = checkpoint_vocab_size(ckpt, prefix=CHECKPOINT_MODEL_PREFIX)
    except (ValueError, CheckpointingException) as e:  # no GPT embedding in it, or not a dist checkpoint
        raise ConfigError(f"teacher.checkpoint {ckpt}: {e}") from e
    tokens = _tokenizer_vocab(cfg)
    student_vocab = run_vocab_size(cfg, tokens)
    # The rows are checked as the run's loader checks them, told the run's tokenizer size: its real
    # rows must all be in the checkpoint, whatever TP size padded it.
    try:
        real = teacher_vocab_size(ckpt, tokens)  # a teacher recorded as made for another tokenizer size is refused
    except ValueError as e:
        raise ConfigError(f"teacher.checkpoint: {e}") from e
    try:
        check_teacher_vocab(student_vocab, teacher_vocab, real, "it")
    except ValueError as e:
        raise ConfigError(f"teacher.checkpoint {ckpt}: {e}") from e
    # Rows are no longer matched exactly, so a teacher of another tokenizer with as many ids would
    # pass the row check: its recorded tokenizer (by content) must be the run's.
    recorded = read_marker(ckpt).get("tokenizer_sha256") if is_complete(ckpt) else None
    if recorded and cfg.data.tokenizer_model:
        ours = tokenizer_sha256(cfg)
        if ours != recorded:
            raise ConfigError(f"teacher.checkpoint {ckpt} was trained with another tokenizer (sha256 {recorded[:12]}...) "
                              f"than data.tokenizer_model {cfg.data.tokenizer_model} ({ours[:12]}...): distillation "
                              "needs the teacher's tokenizer")
    check_teacher_shape(t.model, ckpt)


def _check_store(cfg: RunConfig) -> None:
    """teacher.mode=offline: the store exists, its manifest is readable and its shards are the sizes
    it records, and it was made for this run (tokenizer, sequence length, split, seed, truncation,
    vocabulary, enough samples, and the teacher if teacher.checkpoint names one). Its checksums and
    per-sample token hashes are checked as training reads it."""
    if cfg.teacher.mode != "offline":
        return
    if not cfg.teacher.store:
        raise ConfigError("teacher.store is required for teacher.mode=offline")
    from megadistill.store.format import StoreError
    from megadistill.store.reader import StoreReader, run_mismatches

    try:
        manifest = StoreReader(cfg.teacher.store, verify=False).manifest
    except StoreError as e:
        raise ConfigError(f"teacher.store: {e}") from e
    tok = cfg.data.tokenizer_model
    vocab = _student_vocab(cfg) if tok else None
    problems = run_mismatches(manifest, cfg, vocab, tokenizer_sha256(cfg) if tok else None)
    if problems:
        raise ConfigError(f"teacher.store {cfg.teacher.store} was not made for this run: " + "; ".join(problems))
    from megadistill.resume import store_teacher

    # teacher.checkpoint, if given, must be the store's teacher. Every rank runs this: where only
    # reading all of the teacher's files could tell, rank 0 does it at the start (resume.decide).
    store_teacher(cfg, read_files=False)


def _check_scores(cfg: RunConfig) -> None:
    """data_selection.scores: the score directory exists and is complete (its checksums and its
    match with the run are checked by ``megadistill.salt.selection.sampler_for_run``). Not needed by a run
    resuming after its KD phase, which trains on the full data."""
    scores = cfg.data_selection.scores
    if not scores or _resumes_after_kd(cfg):
        return
    p = Path(scores)
    if not p.is_dir():
        raise ConfigError(f"data_selection.scores: {p} does not exist (write it with megadistill score-data run.yaml)")
    if not (p / "manifest.json").is_file():
        hint = " (a scoring is in progress or was killed: run megadistill score-data again)" if (p / "plan.json").is_file() else ""
        raise ConfigError(f"data_selection.scores: {p} holds no finished scores (no manifest.json){hint}")


def _student_vocab(cfg: RunConfig) -> int:
    """The run's padded vocabulary (:func:`_tokenizer_vocab` padded)."""
    return run_vocab_size(cfg, _tokenizer_vocab(cfg))


def _tokenizer_vocab(cfg: RunConfig) -> int:
    """The run's unpadded vocabulary: the given tokenizer's ids (data.tokenizer_model), or
    data.vocab_size for one still to be trained."""
    if cfg.data.tokenizer_model is None:
        return cfg.data.vocab_size
    from megadistill.data.tokenizer import tokenizer_vocab_size

    try:
        return tokenizer_vocab_size(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    except (DataError, FileNotFoundError) as e:
        raise ConfigError(f"data.tokenizer_model: {e}") from e


def tokenizer_sha256(cfg: RunConfig) -> str:
    """The given tokenizer's identity (the SHA-256 of its .model or tokenizer.json), as the run's
    checkpoints, stores and score files record it."""
    if cfg.data.tokenizer_type == "huggingface":
        from megadistill.data.tokenizer import tokenizer_file

        return file_sha256(tokenizer_file(cfg.data.tokenizer_model, "huggingface"))
    return file_sha256(cfg.data.tokenizer_model)


def check_teacher_shape(model: ModelConfig, ckpt: Path) -> None:
    """teacher.model must describe the checkpoint's architecture: hidden size, layers, FFN, MLP
    activation (gated or not), query groups, tied or untied output layer, biases, LayerNorm or
    RMSNorm (what its tensor shapes and names show)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    p = CHECKPOINT_MODEL_PREFIX
    found = {}
    if p + "embedding.word_embeddings.weight" in meta:
        found["hidden_size"] = meta[p + "embedding.word_embeddings.weight"].global_shape[1]
    fc1 = meta.get(p + "decoder.layers.mlp.linear_fc1.weight")
    if fc1 is not None:
        found["num_layers"], found["ffn_hidden_size"] = fc1.global_shape[0], fc1.global_shape[1]
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    wanted = {
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "ffn_hidden_size": ffn,
    }
    if fc1 is not None:
        # SwiGLU's linear_fc1 stacks the gate and up projections: 2 x ffn_hidden_size rows.
        gated = model.activation == "swiglu"
        rows = fc1.global_shape[1]
        if rows in (ffn, 2 * ffn) and rows != (2 * ffn if gated else ffn):
            raise ConfigError(
                f"teacher.model.activation is {model.activation} but teacher.checkpoint {ckpt} has "
                f"{'a gated (swiglu)' if rows == 2 * ffn else 'an ungated (gelu)'} MLP (linear_fc1 has {rows} rows for "
                f"ffn_hidden_size {ffn})"
            )
        found["ffn_hidden_size"] = rows // 2 if gated else rows
    found.update(_checkpoint_architecture(meta, p, model))
    wanted.update(
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias or model.add_bias_linear,
        normalization=model.normalization,
    )
    for k, v in found.items():
        if wanted[k] != v:
            what = "teacher.model.add_qkv_bias (or add_bias_linear)" if k == "add_qkv_bias" else f"teacher.model.{k}"
            raise ConfigError(f"{what} is {wanted[k]} but teacher.checkpoint {ckpt} has {v}")


def _checkpoint_architecture(meta: dict, p: str, model: ModelConfig) -> dict:
    """The architecture keys a GPT checkpoint's tensor metadata shows (shapes and which tensors exist)."""
    found = {}
    layers = p + "decoder.layers."
    qkv = meta.get(layers + "self_attention.linear_qkv.weight")
    if qkv is not None and (model.kv_channels or model.hidden_size % model.num_attention_heads == 0):
        # [layers, (heads + 2 x query groups) x head_dim, hidden]: the key/value heads per layer.
        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        extra = qkv.global_shape[1] - model.num_attention_heads * head_dim
        if extra > 0 and extra % (2 * head_dim) == 0:
            found["num_query_groups"] = extra // (2 * head_dim)
    if any(k.startswith(layers) for k in meta):
        found["untie_embeddings_and_output_weights"] = p + "output_layer.weight" in meta
        found["add_bias_linear"] = layers + "self_attention.linear_proj.bias" in meta
        found["add_qkv_bias"] = layers + "self_attention.linear_qkv.bias" in meta
        # LayerNorm has a bias, RMSNorm none. megatron-core saves the input norm under TE's fused
        # name (linear_qkv.layer_norm_*) for the local spec too.
        for norm in (layers + "self_attention.linear_qkv.layer_norm_", layers + "input_layernorm."):
            if norm + "weight" in meta:
                found["normalization"] = "LayerNorm" if norm + "bias" in meta else "RMSNorm"
                break
    return found
