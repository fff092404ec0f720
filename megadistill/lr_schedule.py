"""The learning-rate (and weight-decay) schedule: Megatron's ``OptimizerParamScheduler``, for every
backend. It writes ``lr`` and ``weight_decay`` into each ``param_group`` (scaled by the group's
``lr_mult`` / ``wd_mult``), so it drives a Megatron optimizer and a DeepSpeed engine's alike."""

from __future__ import annotations


def lr_scheduler(optimizer, cfg):
    """The schedule of ``cfg.optimizer`` over ``cfg.training.train_steps`` steps; call
    ``.step(increment=1)`` after each optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optimizer, cfg.training.train_steps
    warmup = int(o.warmup_fraction * steps)
    style = {"constant": "constant", "linear": "linear", "cosine": "cosine", "wsd": "WSD"}[o.lr_schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, int(o.wsd_decay_fraction * steps)) if style == "WSD" else None,
        lr_wsd_decay_style="linear" if style == "WSD" else None,
    )
