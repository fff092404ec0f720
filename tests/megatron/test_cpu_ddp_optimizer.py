"""Megatron-core's DDP and (distributed) optimizer train identically on 1 rank, DP=2 and TP=2.

A tiny GPTModel is trained for a few optimizer steps on one fixed global batch through
megatron's own ``get_forward_backward_func`` -> ``finalize_model_grads`` -> ``optimizer.step()``
(``DistributedDataParallel`` + ``get_megatron_optimizer``) on CPU/gloo. The per-step losses and
grad norms must match a plain-torch reference (the same model, ``torch.optim.AdamW``,
``clip_grad_norm_``) and each other across layouts:

* 1 rank, DDP with the ordinary (non-distributed) optimizer;
* 2 ranks DP=2, with the distributed optimizer (each rank holds only its shard of the Adam
  state) and with the ordinary one (full state, all-reduced grads);
* 2 ranks TP=2 (DP=1), with the distributed optimizer.

With DP=2 each rank trains on its half of the global batch, so the loss normalisation has to
make the DP average equal the single-rank average. The loss masks are uneven on purpose (micro-
batches hold different numbers of loss tokens), which separates megatron's loss conventions:

``token_mean``
    ``loss_func`` returns ``(loss_sum, num_tokens, report)`` and
    ``config.calculate_per_token_loss=True``: the schedule leaves the loss summed, DDP sums grads
    over DP, ``finalize_model_grads`` all-reduces the token count over DP and divides the grads by
    it. Objective: the mean over every loss token of the global batch.
``microbatch_mean``
    the same 3-tuple with ``calculate_per_token_loss=False``: the schedule divides each micro-
    batch's loss by *its own* token count and by the number of local micro-batches, DDP scales
    grads by 1/DP. Objective: the mean of the micro-batch means -- not the per-token mean,
    although Megatron-LM's training loop reports this 3-tuple as one
    (``sum(loss_sum) / sum(num_tokens)`` over micro-batches and DP ranks), and so does this test.
``legacy_mean``
    ``loss_func`` returns ``(loss_mean, report)``: the schedule divides by the number of local
    micro-batches. Objective: the mean of the micro-batch means, as above.
"""

from __future__ import annotations

import functools

import pytest
import torch

# Imported once in the pytest parent, so the forked ranks do not pay megatron's import time.
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megadistill.testing import cpu_patches
from megadistill.testing.distributed import run_distributed

LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ = 2, 32, 4, 64, 128, 16
MICRO_BATCH, GLOBAL_BATCH, STEPS = 2, 8, 3  # 4 micro-batches per step on one DP rank
SEED = 1234
# Larger than megatron's default 0.02, so that the grad norm exceeds CLIP and clipping (with its
# cross-rank norm) changes every step.
INIT_STD = 0.2
# Adam's first step is about LR * sign(grad), so float noise in near-zero grads moves weights by
# up to ~LR: at LR 1e-2 the TP=2 losses drift from the 1-rank ones by up to 9e-6, at 3e-3 < 1e-6.
LR, CLIP = 3e-3, 1.0
CONVENTIONS = ("token_mean", "microbatch_mean", "legacy_mean")


def _build_model(convention: str) -> GPTModel:
    # Every model starts from the same weights, whatever was built before it in this process.
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=INIT_STD,
        # Full weights are drawn on every rank and sliced: TP=2 starts from the TP=1 weights.
        use_cpu_initialization=True,
        # Read by the schedule and by DDP's constructor (grad scaling), so set it up front.
        calculate_per_token_loss=convention == "token_mean",
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )


def _global_batch() -> dict[str, torch.Tensor]:
    """GLOBAL_BATCH sequences, the same on every rank and step; masks keep 25-100 % of tokens."""
    generator = torch.Generator().manual_seed(100)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    order = torch.randperm(GLOBAL_BATCH, generator=generator)
    keep = torch.linspace(0.25, 1.0, GLOBAL_BATCH)[order]
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) < keep[:, None]).float()
    loss_mask[:, 0] = 1.0  # at least one loss token per sequence
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask}


def _micro_batches(dp_rank: int = 0, dp_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """This DP rank's contiguous share of the global batch, cut into micro-batches.

    Megatron's convention: DP rank r trains on samples [r*G/dp, (r+1)*G/dp). The micro-batch
    boundaries are the same for every DP size, so "mean of micro-batch means" is well defined.
    """
    per_rank = GLOBAL_BATCH // dp_size
    first = dp_rank * per_rank
    batch = {k: v[first : first + per_rank] for k, v in _global_batch().items()}
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    return [
        {**{k: v[i : i + MICRO_BATCH] for k, v in batch.items()}, "position_ids": position_ids}
        for i in range(0, per_rank, MICRO_BATCH)
    ]


def _forward_step(convention: str, data_iterator, model):
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output: torch.Tensor):
        mask = batch["loss_mask"]
        loss_sum = (output.float() * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        if convention == "legacy_mean":
            loss_mean = loss_sum / num_tokens
            # The schedule divides the returned loss in place: report detached clones.
            return loss_mean, {"lm loss": loss_mean.detach().clone()}
        report = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
        return loss_sum, num_tokens, {"lm loss": report}

    return per_token_loss, loss_func


def _reported_loss(convention: str, losses_reduced: list[dict[str, torch.Tensor]]) -> float:
    """The step's loss over the whole global batch, as a driver must compute it on each rank."""
    dp_group = parallel_state.get_data_parallel_group()
    local = torch.stack([d["lm loss"] for d in losses_reduced])
    if convention == "legacy_mean":
        # Each rank has the mean of its micro-batch means; equal micro-batch counts per rank.
        total = local.mean()
        torch.distributed.all_reduce(total, group=dp_group)
        return total.item() / parallel_state.get_data_parallel_world_size()
    loss_sum, num_tokens = local.sum(0)  # sum, then divide once: not a mean of ratios
    totals = torch.stack([loss_sum, num_tokens])
    torch.distributed.all_reduce(totals, group=dp_group)
    return (totals[0] / totals[1]).item()


def _adam_state_numel(optimizer) -> int:
    return sum(
        state["exp_avg"].numel()
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in opt.optimizer.state.values()
    )


def _megatron_run(convention: str, use_distributed_optimizer: bool) -> dict:
    model = _build_model(convention)
    num_params = sum(p.numel() for p in model.parameters())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(model.config, ddp_config, model)
    # Without it the schedule never calls DDP's grad sync: DP ranks would silently diverge.
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            # AdamW with weight decay 0: the reference needs no per-group decay (megatron's
            # wd_mult=0 for biases/norms only takes effect through OptimizerParamScheduler).
            weight_decay=0.0,
            use_distributed_optimizer=use_distributed_optimizer,
            clip_grad=CLIP,
            bf16=False,
            fp16=False,
            log_num_zeros_in_grad=True,
        ),
        [ddp_model],
    )

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    losses, grad_norms, num_zeros, updated = [], [], [], []
    for _ in range(STEPS):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        micro_batches = _micro_batches(dp_rank, dp_size)
        losses_reduced = get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, convention),
            data_iterator=iter(micro_batches),
            model=[ddp_model],
            num_microbatches=len(micro_batches),
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        update_successful, grad_norm, zeros = optimizer.step()
        losses.append(_reported_loss(convention, losses_reduced))
        grad_norms.append(grad_norm)
        num_zeros.append(zeros)
        updated.append(update_successful)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "num_zeros": num_zeros,
        "updated": updated,
        "num_params": num_params,
        "adam_state_numel": _adam_state_numel(optimizer),
        # Grad buffer size incl. padding (param starts are aligned, the end is padded to DP).
        "buffer_numel": sum(buffer.numel for buffer in ddp_model.buffers),
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def _plain_torch_run(convention: str) -> dict:
    """The same training in plain torch on the full global batch: the ground truth."""
    model = _build_model(convention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-8, weight_decay=0.0)
    losses, grad_norms = [], []
    for _ in range(STEPS):
        sums, counts = [], []
        for mb in _micro_batches():
            per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
            sums.append((per_token * mb["loss_mask"]).sum())
            counts.append(mb["loss_mask"].sum())
        sums, counts = torch.stack(sums), torch.stack(counts)
        token_mean = sums.sum() / counts.sum()
        microbatch_mean = (sums / counts).mean()
        objective = token_mean if convention == "token_mean" else microbatch_mean
        optimizer.zero_grad()
        objective.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        optimizer.step()
        # What megatron reports: per-token mean for the 3-tuple, mean of means for the 2-tuple.
        losses.append((microbatch_mean if convention == "legacy_mean" else token_mean).item())
    return {"losses": losses, "grad_norms": grad_norms}


def _single_rank() -> dict:
    return {
        c: {"plain": _plain_torch_run(c), "ddp": _megatron_run(c, use_distributed_optimizer=False)}
        for c in CONVENTIONS
    }


def _two_ranks(optimizers: tuple[bool, ...]) -> dict:
    return {c: {dist: _megatron_run(c, dist) for dist in optimizers} for c in CONVENTIONS}


@pytest.fixture(scope="module")
def single_rank() -> dict:
    return run_distributed(_single_rank, 1)[0]


def _assert_same_training(got: dict, expected: dict, what: str) -> None:
    assert got["losses"] == pytest.approx(expected["losses"], abs=1e-5), f"{what}: losses"
    assert got["grad_norms"] == pytest.approx(expected["grad_norms"], abs=1e-5), f"{what}: norms"


def test_single_rank_ddp_matches_plain_torch(single_rank):
    for convention, runs in single_rank.items():
        plain, ddp = runs["plain"], runs["ddp"]
        _assert_same_training(ddp, plain, f"{convention} 1 rank")
        assert ddp["updated"] == [True] * STEPS
        assert ddp["adam_state_numel"] == ddp["num_params"]  # unsharded
        assert all(isinstance(z, (int, float)) and z >= 0 for z in ddp["num_zeros"])
        # Clipping is active at every step, and the loss on the (fixed) batch goes down.
        assert min(plain["grad_norms"]) > CLIP
        assert all(b < a - 0.1 for a, b in zip(plain["losses"], plain["losses"][1:]))

    # The uneven loss masks make the conventions genuinely different objectives.
    token, microbatch = single_rank["token_mean"]["plain"], single_rank["microbatch_mean"]["plain"]
    assert token["losses"][0] == pytest.approx(microbatch["losses"][0], abs=1e-6)  # same report
    assert abs(token["grad_norms"][0] - microbatch["grad_norms"][0]) > 1e-3
    legacy = single_rank["legacy_mean"]["plain"]
    assert abs(legacy["losses"][0] - microbatch["losses"][0]) > 1e-3
    assert legacy["grad_norms"] == pytest.approx(microbatch["grad_norms"], abs=1e-6)


def test_data_parallel_2_matches_single_rank(single_rank):
    ranks = run_distributed(_two_ranks, 2, (True, False))
    for convention in CONVENTIONS:
        expected = single_rank[convention]["ddp"]
        for dist in (True, False):
            what = f"{convention} DP=2 {'distributed' if dist else 'plain'} optimizer"
            for rank in ranks:
                got = rank[convention][dist]
                _assert_same_training(got, expected, what)
                assert got["updated"] == [True] * STEPS
                assert got["num_zeros"] == expected["num_zeros"], what
                # The single-rank weights, up to Adam amplifying float noise in near-zero grads
                # (measured 5e-6; a missed or doubled update moves an element by ~LR = 3e-3).
                torch.testing.assert_close(got["weights"], expected["weights"], rtol=0, atol=5e-5)
            # The replicas are identical (the distributed optimizer all-gathered the updates).
            replicas = [rank[convention][dist]["weights"] for rank in ranks]
            assert torch.equal(replicas[0], replicas[1]), what

        # The distributed optimizer shards the Adam state; the plain one holds all of it.
        num_params = expected["num_params"]
        sharded = [rank[convention][True]["adam_state_numel"] for rank in ranks]
        assert sum(sharded) == num_params
        # Each rank owns one contiguous half of the padded buffer (padding has no state).
        shard_size = ranks[0][convention][True]["buffer_numel"] // 2
        assert all(0 < n <= shard_size < 0.55 * num_params for n in sharded), (sharded, shard_size)
        assert all(rank[convention][False]["adam_state_numel"] == num_params for rank in ranks)


def test_tensor_parallel_2_distributed_optimizer_matches_single_rank(single_rank):
    ranks = run_distributed(_two_ranks, 2, (True,), tp=2)
    for convention in CONVENTIONS:
        expected = single_rank[convention]["ddp"]
        for rank in ranks:
            got = rank[convention][True]
            _assert_same_training(got, expected, f"{convention} TP=2")
            assert got["updated"] == [True] * STEPS
            # DP=1: nothing to shard, each TP rank holds the state of its own weight shards.
            assert got["adam_state_numel"] == got["num_params"] < expected["num_params"]


def _type_patch_checks() -> dict:
    """Runs in a forked rank, where the harness has already applied the patch set."""
    import importlib

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer_module = importlib.import_module("megatron.core.optimizer.optimizer")
    buffer_module = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")

    def sites():
        return (
            clip_grads.clip_grad_by_total_norm_fp32,
            optimizer_module.clip_grad_by_total_norm_fp32,
            DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__,
            buffer_module.torch,
            optimizer_module.torch,
            clip_grads.torch,
        )

    before = sites()
    cpu_patches._applied = False  # force a second pass through every site's own guard
    cpu_patches.apply()
    cpu_patches.apply()
    after = sites()

    def inside(t: torch.Tensor):
        return t.type(), t.type(torch.float64).dtype, t.to(torch.bfloat16).type()

    return {
        "same_objects": all(a is b for a, b in zip(before, after)),
        "shared_clip": before[0] is before[1],
        "wrapped_once": not getattr(before[0].__wrapped__, "_megadistill_cpu_patch", False)
        and not getattr(before[2].__wrapped__, "_megadistill_cpu_patch", False),
        "inside": cpu_patches._with_tensor_type_as_cuda(inside)(torch.zeros(2)),
        "outside": torch.zeros(2).type(),
    }


def test_type_patch_is_scoped_and_idempotent():
    result = run_distributed(_type_patch_checks, 1)[0]
    assert result["same_objects"] and result["shared_clip"] and result["wrapped_once"]
    # Inside a wrapped optimizer function: CUDA names, real conversions; outside: untouched.
    expected = ("torch.cuda.FloatTensor", torch.float64, "torch.cuda.BFloat16Tensor")
    assert result["inside"] == expected
    assert result["outside"] == "torch.FloatTensor"
