"""Optimizer parameter groups with Megatron's semantics, for a DeepSpeed engine.

``megatron.core.optimizer.get_megatron_optimizer`` (0.16.1 and 0.19.2: ``_get_param_groups`` with
the standard overrides, ``get_standard_config_overrides``) puts every bias (``*.bias``) and every 1-D parameter (norm weights) in a group
with ``wd_mult = 0`` and the rest in a group with ``wd_mult = 1``, in that order (the override-free
group first), and records ``max_lr`` / ``min_lr`` in each group. ``OptimizerParamScheduler`` reads
those keys: it sets each group's ``lr`` from ``max_lr``/``min_lr`` and its ``weight_decay`` to
``wd x wd_mult``. torch's AdamW keeps such extra keys in its groups, and DeepSpeed's ZeRO
optimizers keep the inner optimizer's groups, so the scheduler can step them the same way.
"""

from __future__ import annotations

import torch


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's classic rule: biases and 1-D parameters are not decayed."""
    return name.endswith(".bias") or len(param.shape) == 1


def megatron_param_groups(model: torch.nn.Module, lr: float, min_lr: float) -> list[dict]:
    """``[decayed, not decayed]`` groups of ``model``'s trainable parameters (empty ones dropped:
    DeepSpeed's ZeRO optimizers cannot flatten an empty group)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = []
    for params, wd_mult in ((decay, 1.0), (no_decay, 0.0)):
        if params:
            groups.append(
                {
                    "params": params,
                    "wd_mult": wd_mult,
                    "lr_mult": 1.0,
                    "is_decoupled_lr": False,
                    "max_lr": lr,
                    "min_lr": min_lr,
                    "default_config": True,
                    "is_expert_parallel": False,
                }
            )
    return groups
