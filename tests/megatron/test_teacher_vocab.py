"""A teacher checkpoint loads whatever its vocabulary padding: one written with ``R`` embedding /
output rows loads into a teacher of more rows (zero padding added) or fewer (padding rows left
unread) at TP=2 and at PP=2 (tied embeddings: the last stage's copy of the embedding), and its
logits on the tokenizer's ids equal the single-process reference's. One whose real rows (the
tokenizer's ids) are not all present is refused in one line; the tokenizer's size comes from the
caller (a run: its tokenizer's, through the online teacher) or from the checkpoint's ``COMPLETE``
marker."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megadistill.testing import run_distributed

V = 130  # the tokenizer's ids; padded to 192 rows at TP=1 and 256 at TP=2 by a multiple of 64 (x TP)
SEQ, BATCH = 8, 2
TOKENS = torch.randint(0, V, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _gpt(rows: int, tied: bool) -> GPTModel:
    """A 2-layer GPT (hidden 32) with ``rows`` vocabulary rows, this rank's TP/PP part."""
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, init_method_std=0.2,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=rows, max_sequence_length=SEQ,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=tied, position_embedding_type="rope")


def _logits(model: GPTModel):
    """The full-vocabulary logits ``[b, s, rows]`` on the last stage (None elsewhere); a PP=2 stage
    hands its hidden states ``[s, b, h]`` on by broadcast (the two stages are the only ranks)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            hidden = torch.empty(SEQ, BATCH, model.config.hidden_size)
            if parallel_state.is_pipeline_first_stage():
                hidden = model(TOKENS, positions, None)
            dist.broadcast(hidden, src=0)
            if not parallel_state.is_pipeline_last_stage():
                return None
            model.set_input_tensor(hidden)
        return gather_from_tensor_model_parallel_region(model(TOKENS, positions, None))


def _run_cfg(tp: int):
    """A run over a tokenizer of ``V`` ids at TP ``tp`` (padded by 64 x TP: 192 rows at TP=1, 256
    at TP=2) whose student and online teacher have ``_gpt``'s shape, untied."""
    from megadistill.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TeacherConfig

    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, init_method_std=0.2,
                 make_vocab_size_divisible_by=64, untie_embeddings_and_output_weights=True)
    return RunConfig(model=ModelConfig(**shape), teacher=TeacherConfig(mode="online", model=ModelConfig(**shape)),
                     data=DataConfig(vocab_size=V, seq_length=SEQ, micro_batch_size=BATCH, global_batch_size=BATCH),
                     parallel=ParallelConfig(tensor_model_parallel_size=tp))


def _write(root: str) -> dict:
    """Four teacher checkpoints written at TP=1 and their reference logits: ``converted`` (192
    rows, padding rows zero, untied) and ``tied`` (192 rows, tied), both with ``vocab_size`` in
    their marker; ``trained`` (384 rows, padding rows not zero, untied, no marker); ``run`` (a
    run's teacher as the run builds it: 192 rows, padding rows not zero, a marker without
    ``vocab_size``, as runs wrote them before recording it)."""
    from megadistill.checkpoint_dir import commit
    from megadistill.config import run_vocab_size
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze, save_model_checkpoint

    out = {}
    for name, rows, tied in (("converted", 192, False), ("tied", 192, True), ("trained", 384, False)):
        torch.manual_seed(len(name))
        model = _gpt(rows, tied)
        if name != "trained":
            with torch.no_grad():  # as convert-hf writes a teacher: the padding rows are zero
                for p in (model.embedding.word_embeddings.weight, None if tied else model.output_layer.weight):
                    if p is not None:
                        p[V:] = 0
            marker = {"vocab_size": V}
            path = commit(f"{root}/{name}", 0, lambda tmp, m=model: save_model_checkpoint(m, tmp), marker)
        else:
            path = f"{root}/{name}"
            save_model_checkpoint(model, path)
        out[name] = (str(path), _logits(model))
    cfg = _run_cfg(1)
    model = freeze(build_gpt(cfg.teacher.model, cfg, run_vocab_size(cfg, V)))
    path = commit(f"{root}/run", 15, lambda tmp: save_model_checkpoint(model, tmp), {"backend": "megatron"})
    out["run"] = (str(path), _logits(model))
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return run_distributed(_write, 1, str(tmp_path_factory.mktemp("teachers")))[0]


def _load(teachers: dict, loads: list) -> list:
    """Each ``(name, rows, vocab_size)`` of ``loads`` loaded into a teacher of ``rows`` rows: its
    full logits (last stage) and whether its rows past the tokenizer's are all zero."""
    from megadistill.megatron.teacher import load_teacher_checkpoint

    results = []
    for name, rows, vocab_size in loads:
        model = load_teacher_checkpoint(_gpt(rows, name == "tied"), teachers[name][0], vocab_size=vocab_size)
        weights = [model.embedding.word_embeddings.weight] if model.pre_process else []
        if model.post_process and model.output_layer.weight is not None:  # None: tied, on the embedding's stage
            weights.append(model.output_layer.weight)
        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        first = rank * rows // tp  # this rank's first global row
        padding_zero = all(not w[max(V - first, 0):].any() for w in weights)
        results.append((_logits(model), padding_zero))
    return results


def _check(got, reference: torch.Tensor, rows: int) -> None:
    logits, _ = got
    assert logits.shape == (BATCH, SEQ, rows)
    assert (logits[..., :V] - reference[..., :V]).abs().max() <= 1e-5


def test_a_teacher_loads_with_more_or_fewer_padding_rows_at_tp2(teachers):
    """192 rows (converted at TP=1) into TP=2's 256: the 64 rows added are zero, and so are the
    logits of every padding id; 384 rows (the marker-less ``trained``, told the tokenizer's size by
    the caller) into 256: the rows past 256 are not read."""
    loads = [("converted", 256, None), ("trained", 256, V)]
    for rank in run_distributed(_load, 2, teachers, loads, tp=2):
        more, fewer = rank
        _check(more, teachers["converted"][1], 256)
        assert more[1] and not more[0][..., V:].any()
        _check(fewer, teachers["trained"][1], 256)


def test_a_tied_teacher_loads_with_more_padding_rows_at_pp2(teachers):
    """Tied embeddings at PP=2: the first stage's embedding and the last stage's copy of it (saved
    under the embedding's key) both get the checkpoint's rows and zero padding."""
    first, last = run_distributed(_load, 2, teachers, [("tied", 256, None)], pp=2)
    assert first == [(None, True)]
    _check(last[0], teachers["tied"][1], 256)
    assert last[0][1] and not last[0][0][..., V:].any()


def _distil(teachers: dict) -> tuple:
    """A run's KD step at this rank's TP from the ``run`` teacher, built as ``megadistill.train``
    builds it: ``make_teacher_source`` told the tokenizer's size, the Megatron backend wrapping the
    student. Returns the step's metrics and the teacher's full logits ``[b, s, rows]``."""
    from megadistill.assemble import build_backend, make_teacher_source
    from megadistill.config import run_vocab_size
    from megadistill.kd.knobs import KDStep
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    cfg = _run_cfg(parallel_state.get_tensor_model_parallel_world_size())
    rows = run_vocab_size(cfg, V)
    source = make_teacher_source(cfg, rows, teachers["run"][0], tokenizer_vocab_size=V)
    backend = build_backend(cfg, rows, source)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    batch = {"tokens": TOKENS, "labels": TOKENS.roll(-1, 1), "loss_mask": torch.ones(BATCH, SEQ),
             "position_ids": positions}
    step = backend.train_step([batch], KDStep(alpha=0.5, temperature=1.0))
    with torch.no_grad():
        _, teacher_logits = source.model(TOKENS, positions, None)
    return step.metrics, gather_from_tensor_model_parallel_region(teacher_logits)


def test_a_run_trained_teacher_distils_a_student_padded_for_tp2(teachers):
    """A teacher trained at TP=1 (192 rows; its marker records no tokenizer size) distils a student
    at TP=2 (256 rows): the run tells the loader its tokenizer's 130 ids, so the 64 rows TP=2 adds
    are padding (zero logits) and the real rows' logits are the TP=1 teacher's."""
    reference = teachers["run"][1]
    for metrics, logits in run_distributed(_distil, 2, teachers, tp=2):
        assert logits.shape == (BATCH, SEQ, 256)
        assert (logits[..., :V] - reference[..., :V]).abs().max() <= 1e-5
        assert not logits[..., 192:].any()
        assert metrics["kd loss"] > 0 and torch.isfinite(torch.tensor(metrics["total loss"]))


def _refusals(teachers: dict) -> list:
    from megadistill.megatron.teacher import load_teacher_checkpoint

    errors = []
    for name, rows, vocab_size in [
        ("trained", 512, 400),  # the caller's tokenizer has ids past the checkpoint's 384 rows
        ("trained", 256, None),  # rows differ and nothing tells padding from real rows
        ("converted", 256, 200),  # the marker records another tokenizer's size than the caller's
    ]:
        try:
            load_teacher_checkpoint(_gpt(rows, False), teachers[name][0], vocab_size=vocab_size)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_a_teacher_without_all_its_real_rows_is_refused_in_one_line(teachers):
    missing, unknown, other = run_distributed(_refusals, 1, teachers)[0]
    trained = teachers["trained"][0]
    assert missing == (f"teacher checkpoint {trained} has 384 vocabulary rows but the tokenizer has 400 ids: rows "
                       "384..399 are missing (a teacher of another tokenizer?)")
    assert unknown.startswith(f"teacher checkpoint {trained} vocabulary size 384 differs from the student's 256 and "
                              "it records no tokenizer vocabulary size")
    assert other == (f"teacher checkpoint {teachers['converted'][0]} was made for a tokenizer of {V} ids, this run's "
                     "has 200; distillation needs the teacher's tokenizer (data.tokenizer_model)")
    assert all("\n" not in e for e in (missing, unknown, other))


def test_the_rows_check_names_the_missing_rows():
    from megadistill.megatron.teacher import check_teacher_vocab

    check_teacher_vocab(256, 192, V, "t")  # more rows in the model: padding
    check_teacher_vocab(192, 384, V, "t")  # more in the checkpoint: padding
    with pytest.raises(ValueError, match=r"^t has 192 vocabulary rows but the tokenizer has 200 ids: rows 192..199 "
                                         r"are missing \(a teacher of another tokenizer\?\)$"):
        check_teacher_vocab(256, 192, 200, "t")


def test_preflight_checks_the_rows_as_the_loader_does(teachers):
    """The run's checks before any process starts: the converted teacher (192 rows, 130 ids in its
    marker) passes for a run at TP=2 (256 rows); a run whose tokenizer has another size is refused.
    A marker-less checkpoint of other rows (384) passes, the run's tokenizer telling its real rows,
    unless that tokenizer has more ids than it has rows."""
    from dataclasses import replace

    from megadistill.config import ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig, TeacherConfig
    from megadistill.preflight import preflight

    teacher = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                          untie_embeddings_and_output_weights=True)
    cfg = RunConfig(teacher=TeacherConfig(mode="online", model=teacher, checkpoint=teachers["converted"][0]),
                    model=ModelConfig(make_vocab_size_divisible_by=64), data=DataConfig(vocab_size=V),
                    parallel=ParallelConfig(tensor_model_parallel_size=2))
    preflight(cfg)
    with pytest.raises(ConfigError, match=rf"^teacher.checkpoint: teacher checkpoint .* was made for a tokenizer of {V} "
                                          r"ids, this run's has 200;"):
        preflight(replace(cfg, data=DataConfig(vocab_size=200)))
    trained = replace(cfg, teacher=replace(cfg.teacher, checkpoint=teachers["trained"][0]))
    preflight(trained)
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint .*: it has 384 vocabulary rows but the tokenizer has 400 "
                                          r"ids: rows 384..399 are missing"):
        preflight(replace(trained, data=DataConfig(vocab_size=400)))
