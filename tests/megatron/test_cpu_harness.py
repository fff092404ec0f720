"""The CPU patch set lets megatron-core's real GPTModel run TP=2 and PP=2 on gloo, matching TP=1.

One reference run (1 rank, TP=1) builds a tiny GPTModel with megatron's own initialisation and
records its weights, logits, loss and gradients. The TP=2 and PP=2 runs load the same weights
(sliced by each parameter's ``partition_dim`` / mapped to the stage's global layer numbers) and
must reproduce them.
"""

from __future__ import annotations

import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch

# Imported once in the pytest parent, so the forked ranks do not pay megatron's import time.
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer import TransformerConfig

from megadistill.testing import cpu_patches
from megadistill.testing.distributed import CPU_ONLY_ENV, cuda_hidden, run_distributed

LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ, MBS, MICRO_BATCHES = 4, 32, 4, 64, 128, 16, 2, 4
# Larger than megatron's default 0.02 so that logits and grads are far from trivially uniform.
INIT_STD = 0.2


def _build_model() -> GPTModel:
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=INIT_STD,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    """MICRO_BATCHES micro-batches of MBS sequences, identical on every rank."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MBS, SEQ + 1), generator=generator)
    position_ids = torch.arange(SEQ).expand(MBS, SEQ)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": position_ids} for t in tokens]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.float().mean()
        # The schedule divides the returned loss in place: report a detached clone.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def _run_schedule(model: GPTModel) -> float | None:
    """Forward+backward all micro-batches with megatron's schedule; mean loss on the last stage."""
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_micro_batches()),
        model=model,
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.stack([d["loss"] for d in losses]).mean().item()


def _grads(model: GPTModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference() -> dict:
    """TP=1, PP=1: megatron-initialised weights and everything the parallel runs must reproduce."""
    model = _build_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _micro_batches()[0]

    logits = model(batch["tokens"], batch["position_ids"], None)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    one_batch_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    schedule_loss = _run_schedule(model)  # the no-pipelining schedule at PP=1
    schedule_grads = _grads(model)
    batches = _micro_batches()
    direct_loss = torch.stack(
        [model(b["tokens"], b["position_ids"], None, labels=b["labels"]).mean() for b in batches]
    ).mean()
    return {
        "weights": weights,
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": one_batch_grads,
        "schedule_loss": schedule_loss,
        "direct_loss": direct_loss.item(),
        "schedule_grads": schedule_grads,
    }


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_distributed(_reference, 1)[0]


def _tp_slice(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    assert param.partition_stride == 1
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp, dim=param.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]


def _tp_run(weights: dict[str, torch.Tensor]) -> dict:
    # RNG patch: the tensor-parallel stream differs across TP ranks, the default stream does not.
    with get_cuda_rng_tracker().fork():
        tp_stream_draw = torch.rand(4)
    default_draw = torch.rand(4)

    model = _build_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_tp_slice(param, weights[name]))
    batch = _micro_batches()[0]
    logits = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    partition_dims = {
        n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        for n, p in model.named_parameters()
    }
    return {
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": _grads(model),
        "partition_dims": partition_dims,
        "tp_stream_draw": tp_stream_draw,
        "default_draw": default_draw,
    }


def test_tensor_parallel_2_matches_single_rank(reference):
    ranks = run_distributed(_tp_run, 2, reference["weights"], tp=2)

    logits = reference["logits"]
    assert logits.shape == (MBS, SEQ, VOCAB)
    assert logits.std() > 0.5  # not a near-uniform, trivially-equal output
    for r in ranks:
        torch.testing.assert_close(r["logits"], logits, rtol=1e-5, atol=1e-5)
        assert r["loss"] == pytest.approx(reference["loss"], rel=1e-6)

    # Sharded grads concatenate to the full ones; replicated grads are equal on both ranks.
    assert set(ranks[0]["grads"]) == set(reference["grads"])
    for name, full in reference["grads"].items():
        dim = ranks[0]["partition_dims"][name]
        if dim is None:
            got = ranks[0]["grads"][name]
            torch.testing.assert_close(ranks[1]["grads"][name], got, rtol=1e-5, atol=1e-6)
        else:
            got = torch.cat([r["grads"][name] for r in ranks], dim=dim)
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

    assert not torch.equal(ranks[0]["tp_stream_draw"], ranks[1]["tp_stream_draw"])
    assert torch.equal(ranks[0]["default_draw"], ranks[1]["default_draw"])


def _global_name(name: str, layer_offset: int) -> str:
    """Stage-local parameter name -> the unsplit model's (decoder layers are numbered per stage)."""
    return re.sub(
        r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + layer_offset}.", name
    )


def _pp_run(weights: dict[str, torch.Tensor]) -> dict:
    model = _build_model()
    layer_offset = model.decoder.layers[0].layer_number - 1
    names = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            # The last stage's copy of the tied embedding is its output layer.
            if name == "output_layer.weight":
                names[name] = "embedding.word_embeddings.weight"
            else:
                names[name] = _global_name(name, layer_offset)
            param.copy_(weights[names[name]])
    loss = _run_schedule(model)
    return {
        "loss": loss,
        "grads": {names[n]: g for n, g in _grads(model).items()},
        # Building the model tied the stages' embeddings through the patched ``.cuda()`` site.
        "tensor_cuda_restored": torch.Tensor.cuda is not cpu_patches._tensor_cuda_identity,
    }


def test_pipeline_parallel_2_1f1b_matches_single_rank(reference):
    # The PP=1 schedule agrees with plain forward passes over the same micro-batches.
    assert reference["schedule_loss"] == pytest.approx(reference["direct_loss"], rel=1e-6)

    first, last = run_distributed(_pp_run, 2, reference["weights"], pp=2)

    assert first["tensor_cuda_restored"] and last["tensor_cuda_restored"]
    assert first["loss"] is None
    assert last["loss"] == pytest.approx(reference["schedule_loss"], rel=1e-6)

    # Every parameter lives on exactly one stage, except the tied embedding: its full gradient is
    # the input-embedding part (first stage) plus the output-layer part (last stage).
    tied = "embedding.word_embeddings.weight"
    expected = reference["schedule_grads"]
    assert (set(first["grads"]) | set(last["grads"])) == set(expected)
    assert set(first["grads"]) & set(last["grads"]) == {tied}
    tied_grad = first["grads"][tied] + last["grads"][tied]
    torch.testing.assert_close(tied_grad, expected[tied], rtol=1e-4, atol=1e-6)
    for stage in (first, last):
        for name, grad in stage["grads"].items():
            if name != tied:
                torch.testing.assert_close(
                    grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
                )


def _patch_checks() -> dict:
    """Runs in a forked rank, where the harness has already applied the patch set."""
    import megatron.core.pipeline_parallel.schedules as schedules
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.transformer.utils import get_default_causal_mask

    before = (schedules.torch, LanguageModule.setup_embeddings_and_output_layer)
    cpu_patches._applied = False  # force a second pass through every site's own guard
    cpu_patches.apply()
    cpu_patches.apply()
    after = (schedules.torch, LanguageModule.setup_embeddings_and_output_layer)

    # fork() switches to a separate stream and restores the default one afterwards.
    state = torch.get_rng_state()
    plain = torch.rand(3)
    torch.set_rng_state(state)
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(3)
    resumed = torch.rand(3)
    return {
        "same_objects": all(a is b for a, b in zip(before, after)),
        "mask": get_default_causal_mask(3),
        "filters": sum(
            isinstance(f, cpu_patches._DropSameGeneratorWarning)
            for f in logging.getLogger("megatron.core.tensor_parallel.random").filters
        ),
        "forked_differs": not torch.equal(plain, forked),
        "fork_restores": torch.equal(plain, resumed),
    }


def test_patch_set_is_idempotent_and_rng_fork_works():
    result = run_distributed(_patch_checks, 1)[0]
    assert result["same_objects"]
    assert result["filters"] == 1
    expected_mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(result["mask"], expected_mask)
    assert result["forked_differs"]
    assert result["fork_restores"]


# -- the ranks run on CPU/gloo on a GPU machine too --------------------------------------------


def _pretend_a_gpu(monkeypatch) -> None:
    """Make this (pytest parent) process look like a GPU machine's, as far as Python can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")


def _device_checks() -> dict:
    """Runs in a forked rank: what the code under test sees there and decides from it."""
    import torch.distributed as dist

    from megadistill import launch
    from megadistill.megatron import cpu, gpt

    teacher = SimpleNamespace(precision=None)  # its default: bf16 on a GPU, fp32 on CPU
    seen = {
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "accelerator_available": torch.accelerator.is_available(),
        "env": {name: os.environ.get(name) for name in CPU_ONLY_ENV},
        "process_group": dist.get_backend(),
        "chosen_backend": launch.choose_backend(os.environ),
        "cpu_layer_needed": cpu.needed("gloo"),
        "cpu_layer_applied": cpu._applied,
        "teacher_precision": gpt.precision(teacher, SimpleNamespace(teacher=SimpleNamespace(model=teacher))),
    }
    try:
        seen["device"] = str(gpt.device())
    except (RuntimeError, AssertionError) as e:  # CUDA asked for where there is none
        seen["device"] = f"error: {e}"
    return seen


def test_ranks_hide_cuda_when_the_parent_sees_a_gpu(monkeypatch):
    _pretend_a_gpu(monkeypatch)
    seen = run_distributed(_device_checks, 2)
    for rank in seen:
        assert rank == {
            "cuda_available": False,
            "device_count": 0,
            "accelerator_available": False,
            "env": {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"},
            "process_group": "gloo",
            "chosen_backend": "gloo",
            "cpu_layer_needed": True,
            "cpu_layer_applied": True,
            "teacher_precision": "fp32",
            "device": "cpu",
        }
    # Hidden in the forked ranks only: the parent still sees its "GPU".
    assert torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_cuda_hidden_is_undone_on_exit(monkeypatch):
    _pretend_a_gpu(monkeypatch)
    monkeypatch.delenv("DS_ACCELERATOR")
    with cuda_hidden():
        assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
        assert {name: os.environ.get(name) for name in CPU_ONLY_ENV} == CPU_ONLY_ENV
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and "DS_ACCELERATOR" not in os.environ
