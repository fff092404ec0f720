"""The optimizer's part of a megatron training checkpoint: its sharded state dict for
``dist_checkpointing`` and restoring it, around megatron-core's distributed-optimizer quirks
(written against 0.16.1; all of them are still there in 0.19.2). Every quirk of its optimizer checkpointing that
:mod:`megadistill.megatron.checkpoint` works around is here, and only here.

(a) ``DistributedOptimizer.sharded_state_dict`` defaults to the 'fully_sharded_model_space'
    format, which fails on save ("ShardedTensor.flattened_range is not supported"): the format
    is always passed explicitly, through ``metadata["distrib_optim_sharding_type"]``.
(b) ``sharded_state_dict(is_loading=True)`` first runs ``self.load_state_dict(self.state_dict())``,
    and ``state_dict()`` asserts that all Adam states share one ``step`` -- with torch's Adam
    (no Apex / Transformer Engine) a fresh optimizer has no state at all, so the assert fails
    (on save too, before the first step). ``_init_fresh_optimizer_state`` first gives every
    parameter what torch's Adam would create lazily on its first step: zero moments and its
    own step tensor 0 (so it changes no result).
(c) ``DistributedOptimizer.load_state_dict`` then sets ``state["step"]`` of every parameter to
    ONE shared tensor; torch's Adam increments each parameter's step in place, so the shared one
    advances once per parameter per step: the first resumed step is right, later ones are not
    (bias correction drifts; measured 7.9e-4 in the loss on step 2). Each state gets its own
    copy after loading (:func:`load_optimizer_state`).
(d) Its parameter-state loaders copy *every* key of the live Adam state, ``step`` included,
    from the loaded tensors; 'fully_reshardable' does not load ``step`` there (KeyError). The
    step is therefore taken out of the live states while the parameter state is copied in, and
    the copy runs under ``no_grad``: fp32 main params are views of the model's parameters,
    which require grad, and an in-place copy into them is an autograd error otherwise.
(e) 'dp_reshardable' covers the gap after a rank's last parameter in a bucket with a padding
    ShardedTensor that runs to the end of the *padded* bucket, past the checkpoint tensor's
    (unpadded) global size, whenever the unpadded end falls inside that gap -- e.g. the first
    stage of PP=2 with tied embeddings, whose shared embedding has a bucket of its own. torch
    DCP then rejects the save plan ("out of bounds chunk"). ``_clip_padding_shards`` trims such
    padding shards (their content is never used) to the global size, on save and on load.
    (Open upstream as NVIDIA/Megatron-LM PR #5898.)
(f) 'fully_reshardable' reads each parameter's state at its offset in the padded grad buffer
    from tensors that have every bucket's end padding removed: with several buckets and
    bucket padding, the state of every parameter after the first padded bucket end is saved
    shifted, partly zero-filled, with only a log warning (fixed upstream in NVIDIA/Megatron-LM
    PR #5077). ``_check_fully_reshardable`` refuses to save from such a layout. (Loading into
    one is fine: the receive buffers are disjoint views or fresh tensors, filled by key.)
(g) A load into an optimizer built with another learning rate (``OptimizerConfig.lr`` /
    ``min_lr``, recorded as ``max_lr``/``min_lr`` in every param group): megatron-core 0.16 loads
    it and the saved values silently win; 0.19 matches param groups by those values and fails
    with a KeyError or ValueError that names neither. :func:`check_learning_rates` refuses it
    on every version, with one line naming both values.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor
from megatron.core.package_info import __version__ as _MCORE_VERSION


def optimizer_sharded_state_dict(optimizer, model_state: dict, is_loading: bool, sharding: str) -> dict:
    """``optimizer.sharded_state_dict`` for a save (``is_loading=False``) or for the request of a
    load; a distributed optimizer's state in format ``sharding`` (``"dp_reshardable"`` or
    ``"fully_reshardable"``; ignored for other optimizers). Collective for a ``fully_reshardable``
    save (f)."""
    for opt in _megatron_optimizers(optimizer):
        _init_fresh_optimizer_state(opt)  # (b); also lets a never-stepped optimizer be saved
    if not is_distributed_optimizer(optimizer):
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    if sharding == "fully_reshardable" and not is_loading:
        _check_fully_reshardable(optimizer)  # (f)
    metadata = {"distrib_optim_sharding_type": sharding}  # (a)
    state = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    if sharding == "dp_reshardable":
        _clip_padding_shards(state)  # (e)
    return state


def _clip_padding_shards(tree) -> None:
    """(e): trim 'dp_reshardable' padding shards that reach past their tensor's global size."""
    if isinstance(tree, dict):
        padding = tree.get("padding")
        if isinstance(padding, LocalNonpersistentObject) and padding.obj is True:
            for key, value in tree.items():
                if isinstance(value, ShardedTensor) and len(value.global_shape) == 1:
                    end = value.global_offset[0] + value.local_shape[0]
                    overflow = end - value.global_shape[0]
                    if overflow > 0:
                        keep = value.local_shape[0] - overflow
                        if keep > 0:
                            tree[key] = replace(value, data=value.data[:keep], local_shape=(keep,))
                        else:  # wholly outside: not part of the checkpoint at all
                            tree[key] = LocalNonpersistentObject(value.data)
            return
        for value in tree.values():
            _clip_padding_shards(value)
    elif isinstance(tree, list):
        for value in tree:
            _clip_padding_shards(value)


def _check_fully_reshardable(optimizer) -> None:
    """(f): refuse to save 'fully_reshardable' state that megatron-core would save shifted."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    bad = []
    for opt in _megatron_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            for i, buffer in enumerate(opt.buffers):
                padded = [b.grad_data.numel() != b.numel_unpadded for b in buffer.buckets[:-1]]
                if any(padded):
                    bad.append(f"buffer {i}: {len(buffer.buckets)} buckets")
    bad = [b for rank_bad in _all_gather(bad) for b in rank_bad]  # every rank decides alike
    if bad:
        raise ValueError(
            "optimizer_sharding='fully_reshardable' would save wrong optimizer state with megatron-core "
            f"{_MCORE_VERSION} when a gradient buffer has several padded buckets ({'; '.join(sorted(set(bad)))}): "
            "use optimizer_sharding='dp_reshardable', or a single bucket per buffer "
            "(DistributedDataParallelConfig.bucket_size=None, no pipeline-parallel tied embeddings)"
        )


def _init_fresh_optimizer_state(opt) -> None:
    """(b): give a never-stepped torch Adam inside a DistributedOptimizer its state tensors."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(opt, "optimizer", None)
    if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return
    if getattr(opt.config, "use_precision_aware_optimizer", False):
        return  # Transformer Engine's FusedAdam: not torch's state layout
    if any(len(inner.state[p]) for group in inner.param_groups for p in group["params"]):
        return  # already stepped or loaded
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            on_device = group.get("capturable", False) or group.get("fused", False)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer, state) -> None:
    """Restore the optimizer state ``dist_checkpointing.load`` returned for the request
    :func:`optimizer_sharded_state_dict` made; each parameter gets its own ``step`` tensor (c)."""
    leaves = _megatron_optimizers(optimizer)
    for opt, sub in zip(leaves, _leaf_states(leaves, state), strict=True):
        _load_leaf_optimizer_state(opt, sub)
    if len(leaves) > 1:
        optimizer._synchronize_steps()
    _unshare_steps(optimizer)  # (c)


_LR_KEYS = ("max_lr", "min_lr")


def check_learning_rates(optimizer, state, where: str) -> None:
    """(g): raise ValueError unless the param groups of the loaded optimizer ``state`` (from
    ``dist_checkpointing.load``) have the learning rates ``optimizer``'s have. ``where`` names the
    checkpoint in the message."""
    leaves = _megatron_optimizers(optimizer)
    subs = _leaf_states(leaves, state)
    for opt, sub in zip(leaves, subs, strict=True):
        saved_groups = _saved_param_groups(sub)
        if saved_groups is None:
            continue  # nothing recorded to compare with
        saved = sorted({tuple(g.get(k) for k in _LR_KEYS) for g in saved_groups}, key=str)
        live = sorted({tuple(g.get(k) for k in _LR_KEYS) for g in opt.param_groups}, key=str)
        if saved != live:
            raise ValueError(
                f"{where} was saved by an optimizer with (max_lr, min_lr) {_pairs(saved)}, this optimizer has "
                f"{_pairs(live)}: build it with the saved optimizer lr and min_lr (megatron-core would keep the "
                "saved ones, or refuse), or load the model alone (optimizer=None) to train on with a new learning rate"
            )


def _pairs(pairs: list) -> str:
    return ", ".join(f"({a:g}, {b:g})" if isinstance(a, float) and isinstance(b, float) else str((a, b)) for a, b in pairs)


def _saved_param_groups(state) -> list | None:
    """The param groups in one optimizer's loaded state: under ``optimizer`` (distributed and
    mixed-precision optimizers) or at the top (``FP32Optimizer``)."""
    if not isinstance(state, dict):
        return None
    inner = state.get("optimizer", state)
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    return groups if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None


def _leaf_states(leaves: list, state) -> list:
    """One loaded sub-state per leaf optimizer (a ChainedOptimizer's are keyed by index)."""
    if len(leaves) > 1:
        return [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
    return [state]


def _load_leaf_optimizer_state(opt, state: dict) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not isinstance(opt, DistributedOptimizer):
        opt.load_state_dict(state)
        return
    state = dict(state)
    param_state = state.pop("param_state")
    sharding = state.pop("param_state_sharding_type")
    opt.load_state_dict(state)  # torch Adam state with ONE shared step (c), param groups, scaler
    inner = opt.optimizer
    steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}  # (d)
    try:
        with torch.no_grad():  # (d)
            if sharding == "dp_reshardable":
                opt.load_parameter_state_from_dp_reshardable(param_state)
            elif sharding == "fully_reshardable":
                opt.load_parameter_state_from_fully_reshardable(param_state)
            else:
                raise ValueError(f"unsupported distributed-optimizer checkpoint format {sharding!r}")
    finally:
        for p, step in steps.items():
            inner.state[p]["step"] = step


def _unshare_steps(optimizer) -> None:
    """(c): one ``step`` tensor per parameter state (clones; values unchanged)."""
    for opt in _megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for s in inner.state.values():
            if torch.is_tensor(s.get("step")):
                s["step"] = s["step"].clone()


def is_distributed_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is (or chains) a megatron-core ``DistributedOptimizer``."""
    if optimizer is None:
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in _megatron_optimizers(optimizer))


def _megatron_optimizers(optimizer) -> list:
    """The leaf megatron optimizers (a ``ChainedOptimizer`` holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _all_gather(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
