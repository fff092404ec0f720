"""The teacher pre-pass (``teacher.placement: prepass``): before the student's schedule for a step,
the frozen online teacher runs forward-only over that step's micro-batches through its own
pipeline schedule, and its last stage turns each micro-batch's logits into sparse targets right
away, as ``precompute-logits`` selects them for a store (:mod:`megadistill.store.sparse`): the
top-p-k ids with the exact tempered ghost bucket at the step's τ, or RS-KD draws made at it. The
targets stay on the ranks of the last stage for that step and are served through the teacher-source
seam by the micro-batch's global sample indices, as the offline store serves them.

The student's schedule then runs unchanged (no teacher hidden states ride in its stage tensors),
and the teacher's logits exist one micro-batch at a time, on the last stage only. The teacher uses
the student's tensor- and pipeline-parallel layout (its stage ``i`` on the ranks of the student's
stage ``i``), so the last stages coincide and the targets never travel.
"""

from __future__ import annotations

import gc
import time
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megadistill import rng
from megadistill.kd.teacher import SparseLogits
from megadistill.losses import KDLossConfig
from megadistill.megatron.layout import Layout, process_groups
from megadistill.store.sparse import rskd_uniforms, sample_rskd, select_top_p_k


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _exchange(ops: list) -> None:
    """Run point-to-point ``ops`` (``dist.P2POp``) together and wait for them."""
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class PrepassTeacher:
    """A ``TeacherSource`` whose targets are made by :meth:`prepare` for the step's micro-batches.

    ``build`` makes this rank's stage of the frozen teacher (weights loaded), called at the first
    pre-pass; ``kd`` is the loss's config (its top-p/top-k decide the kept ids);
    ``targets`` is ``top_p_k`` or ``rskd`` (``draws`` draws per position, their uniforms a hash of
    ``seed``, the global sample index and the position, as the offline store's: the same targets
    on any layout and after a resume).
    """

    def __init__(self, build: Callable[..., torch.nn.Module], kd: KDLossConfig, seq_length: int,
                 targets: str = "top_p_k", draws: int = 12, seed: int = 0,
                 layout: Optional[tuple[int, int]] = None) -> None:
        if targets not in ("top_p_k", "rskd"):
            raise ValueError(f"pre-pass targets {targets!r} is not one of ('top_p_k', 'rskd')")
        if targets == "top_p_k" and not kd.truncates:
            raise ValueError("pre-pass top-p-k targets need truncation (top_p < 1 or top_k)")
        self._build: Optional[Callable[[], torch.nn.Module]] = build
        self.kd, self.seq_length, self.kind, self.draws, self.seed = kd, seq_length, targets, draws, seed
        self.teacher: Optional[torch.nn.Module] = None
        self.active = False
        self.released = False
        self._targets: dict[tuple, SparseLogits] = {}
        self._seconds = 0.0
        self.layout = layout
        self.pgs = None  # the teacher's own process groups, when its layout is not the student's

    @classmethod
    def for_run(cls, cfg, build: Callable[[], torch.nn.Module]) -> "PrepassTeacher":
        t = cfg.teacher
        return cls(build, cfg.kd.loss_config(), cfg.data.seq_length, t.prepass_targets, t.prepass_draws,
                   cfg.training.seed, t.layout(cfg.parallel))

    # ------------------------------------------------------------------ TeacherSource

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        return student  # the teacher is built at the first pre-pass, once every student chunk exists

    def _ensure_teacher(self) -> torch.nn.Module:
        """The teacher, built on first use: after the student's model chunks (building a stage
        all-reduces its tied embedding across the pipeline, in the same order on every rank), and
        with the random state set aside, so that a resumed run draws what an uninterrupted one does."""
        if self.teacher is None:
            student = (parallel_state.get_tensor_model_parallel_world_size(),
                       parallel_state.get_pipeline_model_parallel_world_size())
            if self.layout is not None and tuple(self.layout) != student:
                self.pgs = process_groups(Layout.of(*self.layout, dist.get_world_size()))
            # Every generator a step draws from, megatron-core's model-parallel tracker included
            # (a GPU build initialises weights inside it), is put back as it was.
            state = rng.get_state()
            try:
                self.teacher = self._build(self.pgs) if self.pgs is not None else self._build()
            finally:
                rng.set_state(state)
            self._build = None
        return self.teacher

    def set_active(self, active: bool) -> None:
        if active and self.released:
            raise RuntimeError("the teacher was released (KD has ended for this run): it cannot be activated again")
        self.active = active
        if not active:
            self._targets.clear()  # nothing to serve (validation, α = 0): not held meanwhile

    def prepare(self, micro_batches: list[dict], knobs) -> None:
        """Run the teacher over ``micro_batches`` (collective over its pipeline and tensor-parallel
        groups: every stage calls it with the same micro-batches) and keep, on the last stage, each
        one's targets at ``knobs.temperature``; targets of an earlier step are dropped."""
        from megadistill.store.precompute import teacher_forwards

        self._targets.clear()
        if not self.active or not micro_batches:
            return
        t0 = time.perf_counter()
        teacher = self._ensure_teacher()
        select = partial(self._select, temperature=float(knobs.temperature))
        with torch.no_grad():
            if self.pgs is None:
                teacher_forwards(teacher, micro_batches, self.seq_length, select)
            else:
                batches, keys, local = self._global_batch(micro_batches)
                t_dp, d_t = self.pgs.dp.size(), self.pgs.dp.rank()
                share = [batches[j] for j in range(len(batches)) if j % t_dp == d_t]
                teacher_forwards(teacher, share, self.seq_length, select, pg_collection=self.pgs)
                self._route(keys, local, float(knobs.temperature))
        self._seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ a layout of its own

    def _global_batch(self, micro_batches: list[dict]) -> tuple[list[dict], list[tuple], int]:
        """Every micro-batch of the step's global batch, from each student data-parallel replica's
        own (one all-gather of their tokens, positions and sample indices over the student's
        data-parallel group): ``(batches, their index keys, micro-batches per student replica)``.
        Global micro-batch ``j`` is replica ``j // M``'s ``j % M``-th; the teacher's replica ``r``
        runs those with ``j % DP_teacher = r``."""
        group = parallel_state.get_data_parallel_group()
        fields = ("tokens", "position_ids", "indices")
        mine = [torch.stack([mb[f] for mb in micro_batches]).contiguous() for f in fields]
        gathered = []
        for t in mine:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t, group=group)
            gathered.append(torch.cat(parts))
        batches = [{f: g[j] for f, g in zip(fields, gathered)} for j in range(gathered[0].shape[0])]
        keys = [tuple(b["indices"].tolist()) for b in batches]
        return batches, keys, len(micro_batches)

    def _route(self, keys: list[tuple], local: int, temperature: float) -> None:
        """Send each global micro-batch's targets from the teacher's last stage (TP rank 0 of the
        replica that ran it) to the ranks of the student's last stage that train on it, unless they
        hold them already; keep on this rank only the targets its own loss reads."""
        world, me = dist.get_world_size(), dist.get_rank()
        t_tp, t_pp = self.layout
        teacher = Layout.of(t_tp, t_pp, world)
        student = Layout.of(parallel_state.get_tensor_model_parallel_world_size(),
                            parallel_state.get_pipeline_model_parallel_world_size(), world)
        plan = []  # (j, source, receivers)
        wanted = set()
        for j, key in enumerate(keys):
            holders = {teacher.rank(t, j % teacher.dp, teacher.pp - 1) for t in range(teacher.tp)}
            dests = {student.rank(t, j // local, student.pp - 1) for t in range(student.tp)}
            if me in dests:
                wanted.add(key)
            plan.append((j, min(holders), sorted(dests - holders)))
        rskd = self.kind == "rskd"
        tails = 0 if rskd or temperature == 1.0 else 1
        dev = _device()
        # Phase 1: the number of kept ids per position (it varies by micro-batch) of each message.
        ops, heads = [], {}
        for j, src, receivers in plan:
            for dst in receivers:
                if me == src:
                    k = self._targets[keys[j]].ids.shape[-1]
                    ops.append(dist.P2POp(dist.isend, torch.tensor([k], device=dev), dst, tag=4 * j))
                elif me == dst:
                    heads[j] = torch.zeros(1, dtype=torch.long, device=dev)
                    ops.append(dist.P2POp(dist.irecv, heads[j], src, tag=4 * j))
        _exchange(ops)
        # Phase 2: ids, log-probs and (top-p-k) the ghost bucket's residual and tail.
        ops, incoming = [], {}
        b, s = len(keys[0]), self.seq_length  # every micro-batch: [b, s] tokens
        for j, src, receivers in plan:
            for dst in receivers:
                if me == src:
                    t = self._targets[keys[j]]
                    parts = [t.ids, t.logprobs] + ([] if rskd else [t.residual]) + ([t.tails] if tails else [])
                    ops += [dist.P2POp(dist.isend, x.contiguous(), dst, tag=4 * j + i) for i, x in enumerate(parts)]
                elif me == dst:
                    k = int(heads[j].item())
                    parts = [torch.empty((b, s, k), dtype=torch.long, device=dev),
                             torch.empty((b, s, k), dtype=torch.float64, device=dev)]
                    parts += [] if rskd else [torch.empty((b, s), dtype=torch.float64, device=dev)]
                    parts += [torch.empty((b, s, 1), dtype=torch.float64, device=dev)] if tails else []
                    incoming[keys[j]] = parts
                    ops += [dist.P2POp(dist.irecv, x, src, tag=4 * j + i) for i, x in enumerate(parts)]
        _exchange(ops)
        for key, parts in incoming.items():
            if rskd:
                self._targets[key] = SparseLogits(parts[0], parts[1], drawn_at=temperature, checked=True)
            else:
                self._targets[key] = SparseLogits(parts[0], parts[1], parts[2], parts[3] if tails else None,
                                                  (temperature,) if tails else (), checked=True)
        for key in list(self._targets):
            if key not in wanted:
                del self._targets[key]

    def _select(self, mb: dict, logits: torch.Tensor, temperature: float) -> None:
        """Last stage: the sparse targets of one micro-batch's ``logits[b, s, v/tp]``, identical on
        every rank of the tensor-parallel group."""
        b, s = mb["tokens"].shape
        flat = logits.reshape(b * s, -1)
        group = parallel_state.get_tensor_model_parallel_group() if self.pgs is None else self.pgs.tp
        indices = mb["indices"].cpu().numpy()
        if self.kind == "rskd":
            u = rskd_uniforms(self.seed, np.repeat(indices, s), np.tile(np.arange(s), b), self.draws)
            ids, counts = sample_rskd(flat, torch.from_numpy(u), group, temperature=temperature)
            lp = torch.where(ids >= 0, torch.log(counts.double() / self.draws), 0.0)
            target = SparseLogits(ids.reshape(b, s, -1), lp.reshape(b, s, -1), drawn_at=temperature, checked=True)
        else:
            # A ghost bucket at τ ≠ 1 needs the truncated ids' tempered mass; at τ = 1 the residual.
            temps = () if temperature == 1.0 else (temperature,)
            ids, lp, res, tails = select_top_p_k(flat, self.kd, group, temps)
            lp = torch.where(ids >= 0, lp, 0.0)
            target = SparseLogits(ids.reshape(b, s, -1), lp.reshape(b, s, -1), res.reshape(b, s),
                                  tails.reshape(b, s, -1) if temps else None, temps, checked=True)
        self._targets[tuple(indices.tolist())] = target

    def split(self, batch: dict, output):
        if not self.active:
            return output, None
        key = tuple(batch["indices"].tolist())
        # Kept for the step (not popped): under the interleaved schedule every model chunk's
        # forward step asks, and only the last chunk's loss uses the answer.
        target = self._targets.get(key)
        if target is None:
            if not parallel_state.is_pipeline_last_stage():
                return output, None  # targets live on the last stage, where the loss is computed
            raise RuntimeError(
                f"no pre-pass targets for samples {key[0]}..{key[-1]}: the backend must call prepare() with "
                "the step's micro-batches before its schedule"
            )
        dev = output.device
        return output, SparseLogits(
            target.ids.to(dev), target.logprobs.to(dev), None if target.residual is None else target.residual.to(dev),
            None if target.tails is None else target.tails.to(dev), target.temperatures, target.drawn_at, True,
        )

    def take_seconds(self) -> Optional[float]:
        s, self._seconds = self._seconds, 0.0
        return s

    def close(self) -> None:
        self._targets.clear()

    def release(self) -> None:
        self.close()
        self.teacher = self._build = None
        self.active, self.released = False, True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
