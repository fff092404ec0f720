"""The student's weights in a DeepSpeed backend checkpoint, as one full megatron-core state dict
(TP = 1, local-spec names; ``megadistill export-hf``). Optimizer state is not read, except where
ZeRO-3 keeps the weights nowhere else.

The engine's checkpoint (``engine/engine/`` inside a step directory, :mod:`megadistill.deepspeed.checkpoint`)
holds, per tensor-parallel rank ``t``:

- ZeRO 1 and 2: ``mp_rank_{t:02d}_model_states.pt``, whose ``module`` entry is that rank's GPT
  state dict with real tensors, in the model's dtype (bf16 for a bf16 student, whose fp32 master
  copies live in the optimizer files): read as they are;
- ZeRO 3: ``zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt`` per data-parallel rank ``d``, whose
  ``module`` holds empty placeholders; the weights exist only as the fp32 partitions in the
  optimizer files. DeepSpeed's own reader (``deepspeed.utils.zero_to_fp32``) joins them. It reads
  every ``*_model_states.pt`` / ``*_optim_states.pt`` file of a directory as one tensor-parallel
  rank's, so each rank's files are shown to it in a directory of their own (symbolic links).

The per-rank state dicts are then joined (:func:`megadistill.megatron.full_state.merge_tensor_parallel`).
Parameter names are the student's: a student trained with an online teacher was wrapped
(``DistillationModel``), whose module state is the student's own; DeepSpeed's ZeRO-3 records name
the parameters through the wrapper (``module.``), which is taken off.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch

from megadistill.deepspeed.checkpoint import ENGINE_DIR, ENGINE_TAG, read_meta
from megadistill.megatron.full_state import local_names, merge_tensor_parallel

_WRAPPER = "module."  # DistillationModel's student attribute, in DeepSpeed's ZeRO-3 parameter records


def read_student_weights(directory: str | Path, gated: bool) -> dict[str, torch.Tensor]:
    """The student's full state dict (name -> tensor, vocabulary rows as saved) of the DeepSpeed
    backend checkpoint ``directory`` (a ``step_*`` directory); ``gated``: the student's MLP is a
    gated unit (``model.activation`` swiglu). Raises ``ValueError`` naming the file for a
    checkpoint that is not the DeepSpeed backend's or whose files are missing."""
    directory = Path(directory)
    meta = read_meta(directory)
    stage, tp = int(meta["zero_stage"]), int(meta.get("tensor_parallel_size", 1))
    engine = directory / ENGINE_DIR / ENGINE_TAG
    if not engine.is_dir():
        raise ValueError(f"{directory}: the DeepSpeed engine checkpoint {engine} is missing")
    read = _module_states if stage < 3 else _zero3_weights
    return merge_tensor_parallel([local_names(read(engine, rank)) for rank in range(tp)], gated)


def _module_states(engine: Path, rank: int) -> dict:
    """ZeRO 1/2: tensor-parallel rank ``rank``'s module state dict, as the engine saved it."""
    file = engine / f"mp_rank_{rank:02d}_model_states.pt"
    if not file.is_file():
        raise ValueError(f"{file} is missing: not a complete DeepSpeed ZeRO-1/2 checkpoint")
    # DeepSpeed's own file (it holds its config objects, not only tensors); checked against the
    # checkpoint's checksums by the caller.
    state = torch.load(file, map_location="cpu", weights_only=False)
    return state["module"]


def _zero3_weights(engine: Path, rank: int) -> dict:
    """ZeRO 3: tensor-parallel rank ``rank``'s weights (fp32) joined from its data-parallel
    partitions by DeepSpeed's ``zero_to_fp32``."""
    from megadistill.deepspeed import env

    env.configure_accelerator()  # before DeepSpeed is imported: no JIT-built ops on a CPU machine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mine = f"_mp_rank_{rank:02d}_"
    files = sorted(p for p in engine.iterdir()
                   if mine in p.name and p.name.endswith(("_model_states.pt", "_optim_states.pt")))
    if not files:
        raise ValueError(f"{engine} holds no ZeRO-3 files of tensor-parallel rank {rank} (*{mine}*_states.pt)")
    with tempfile.TemporaryDirectory(prefix="megadistill-zero3-") as d:
        tag = Path(d) / ENGINE_TAG
        tag.mkdir()
        for f in files:
            os.symlink(f.resolve(), tag / f.name)
        # zero_to_fp32 reports its progress on stdout/stderr: not this command's output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(d, tag=ENGINE_TAG)
    return {k[len(_WRAPPER):] if k.startswith(_WRAPPER) else k: v for k, v in state.items()}
