"""``megadistill precompute-logits run.yaml``: run a finished teacher over a run's training
samples once and write their top-p-k targets (or RS-KD draws, ``kind="rskd"``) to ``teacher.store``.

The samples are the ones the student's sampler asks for, by global sample index
``0 .. train_steps × global_batch_size - 1``, built exactly as training builds them
(``megadistill.data.datasets.prepare_data``). Shard ``i`` (samples ``[i·S, (i+1)·S)``) is computed by
data-parallel rank ``i mod DP``, each teacher forward over ``data.micro_batch_size`` samples of one
shard, so a shard's bytes do not depend on the number of ranks (and a resumed run, which skips the
finished shards, writes the same files as an uninterrupted one). Under tensor parallelism the
truncation is decided on the *global* vocabulary and the kept ids are gathered from every vocab
shard (``megadistill.store.sparse``). Under pipeline parallelism the teacher's
stages run megatron-core's forward-only schedule over each shard's micro-batches; the last stage
selects the targets and its TP rank 0 writes, so the writer set is one rank per data-parallel
replica whatever the layout.

A store can also be written by ``N`` independent jobs (a SLURM job array, ``--array=0-(N-1)``):
task ``t`` computes the shards ``i`` with ``i mod N = t`` (:func:`task_shards`), and whichever task
finds every shard present once its own are written writes the manifest. Shards are written
atomically and their bytes depend only on the plan, so the tasks may run in any order, at once or
one after another, and be killed and re-run: the store ends byte-identical to a single job's. A
shard found on disk counts only if its bytes hash to the sha256 sealed into it
(``writer.verified_shards``): one damaged after it was written is computed again on a re-run, and
the manifest records only verified checksums.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megadistill.checkpoint_identity import checkpoint_identity
from megadistill.collective import on_rank0 as _on_rank0
from megadistill.config import ConfigError
from megadistill.hashing import file_sha256
from megadistill.kd.knobs import KnobSchedule
from megadistill.store.sparse import rskd_uniforms, sample_rskd, select_top_p_k
from megadistill.store.codec import LOGPROB_DTYPES, count_dtype, id_bits
from megadistill.store.encode import SampleTargets, encode_shard
from megadistill.store.temperatures import store_temperatures
from megadistill.store.format import DEFAULT_SAMPLES_PER_SHARD, FORMAT_VERSION, KINDS, StoreError, sample_hash, shard_name

def _plan(cfg, ckpt: Path, tokenizer_sha256: str, dataset: dict, vocab: int, samples_per_shard: int,
          logprob_dtype: str, kind: str = "top_p_k", draws: int = 12, compression: Optional[str] = None,
          temperatures: tuple = (1.0,)) -> dict:
    from megadistill.config import to_dict
    from megadistill.store.codec import RESIDUAL_DTYPES

    k = cfg.kd
    if kind == "rskd":
        # No truncation: the targets are samples of the full distribution at the one temperature.
        how = {"sampling": {"draws": draws, "seed": cfg.training.seed, "temperature": temperatures[0],
                            "method": "inverse CDF over the global vocabulary, u = splitmix64(seed, sample, position, draw)"}}
        enc = {"vocab_size": vocab, "id_bits": id_bits(vocab), "draw_dtype": count_dtype(draws).str,
               "ids_per_position": "variable (distinct ids drawn, <= draws)", "compression": compression}
    else:
        how = {"truncation": {"top_p": k.top_p, "top_k": k.top_k, "ties": "kept", "temperatures": list(temperatures)}}
        enc = {"vocab_size": vocab, "id_bits": id_bits(vocab), "logprob_dtype": logprob_dtype,
               "residual_dtype": RESIDUAL_DTYPES[logprob_dtype], "ids_per_position": "variable (per-position counts)",
               "compression": compression}
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **how,
        "encoding": enc,
        "identity": {
            "teacher": {**checkpoint_identity(ckpt), "model": to_dict(cfg.teacher.model)},
            "tokenizer_sha256": tokenizer_sha256,
            "dataset": dataset,
        },
        "num_samples": cfg.training.train_steps * cfg.data.global_batch_size,
        "samples_per_shard": samples_per_shard,
    }


def task_shards(num_shards: int, task: int, tasks: int) -> list[int]:
    """The shards array task ``task`` of ``tasks`` computes: every ``tasks``-th, starting at ``task``.
    Interleaved rather than in blocks, so the short last shard does not make one task's share lighter
    than the others' by a whole block."""
    return list(range(task, num_shards, tasks))


def shard_task_from_env(environ=None) -> tuple[int, int]:
    """``(task, tasks)`` of a SLURM job array (``SLURM_ARRAY_TASK_ID`` relative to
    ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``), or ``(0, 1)`` outside one.

    Raises ``ConfigError`` for an array whose task ids are not consecutive (``--array=0-7:2`` or
    ``--array=1,5``): task ``t`` could not be mapped to its share of the shards without gaps."""
    import os

    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    try:
        task_id = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        hi = int(env.get("SLURM_ARRAY_TASK_MAX", task_id))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", hi - lo + 1))
    except ValueError as e:
        raise ConfigError(f"SLURM job array variables are not integers ({e}): give --shard-task and --shard-tasks") from e
    if hi - lo + 1 != count:
        raise ConfigError(f"the job array's task ids {lo}..{hi} are not {count} consecutive ids (--array with a step "
                          "or a list): submit --array=0-(N-1), or give --shard-task and --shard-tasks")
    return task_id - lo, count


def _micro_batches(train_ds, first: int, count: int, micro_batch_size: int, dev) -> list[list[dict]]:
    """Samples ``[first, first + count)`` of one shard as micro-batches of ``micro_batch_size``
    (the last may be shorter), grouped into runs of equal size: one forward-only schedule call per
    run, since a pipeline's send/receive shapes are fixed for a call. Each micro-batch holds
    ``first`` (its first global sample), ``tokens[b, s]`` and ``position_ids[b, s]`` on ``dev``,
    and the samples' ``hashes`` (:func:`sample_hash` of tokens and labels)."""
    runs: list[list[dict]] = []
    for a in range(first, first + count, micro_batch_size):
        chunk = [train_ds[j] for j in range(a, min(a + micro_batch_size, first + count))]
        mb = {
            "first": a,
            "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in chunk]).to(dev),
            "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in chunk]).to(dev),
            "hashes": [sample_hash(s["tokens"], s["labels"]) for s in chunk],
        }
        if runs and len(runs[-1][0]["hashes"]) == len(chunk):
            runs[-1].append(mb)
        else:
            runs.append([mb])
    return runs


def teacher_forwards(teacher, micro_batches: list[dict], seq_length: int, on_logits, pg_collection=None) -> None:
    """Run the frozen ``teacher`` (this rank's pipeline stage) over ``micro_batches`` (each with
    ``tokens[b, s]`` and ``position_ids[b, s]``, the same ``b`` for all) through megatron-core's
    forward-only schedule (:func:`megadistill.megatron.schedule.forward_backward`): without
    pipeline parallelism one forward per micro-batch; with it, stage-to-stage activations
    ``[s, b, h]`` travel by p2p and the stages overlap across micro-batches.

    On the last pipeline stage only, ``on_logits(mb, logits[b, s, v/tp])`` is called for each
    micro-batch in order, right after its forward, so only one micro-batch's logits are alive at a
    time. Collective over the pipeline (and tensor-parallel) group: every stage must call it with
    the same micro-batch count and shapes. ``pg_collection``: the teacher's own layout's groups,
    for a teacher built with them."""
    from megadistill.megatron.schedule import forward_backward

    def consume(mb, logits):
        on_logits(mb, logits)
        # The schedule treats this as a loss (scales it in place): a fresh scalar, nothing else.
        return torch.zeros((), device=logits.device), {}

    def step(data_iterator, model):
        mb = next(data_iterator)
        # On a non-first stage the tokens are ignored (the input is the received activation).
        return model(mb["tokens"], mb["position_ids"], None), partial(consume, mb)

    forward_backward(forward_step_func=step, data_iterator=iter(micro_batches), model=teacher,
                     num_microbatches=len(micro_batches), seq_length=seq_length,
                     micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=True,
                     pg_collection=pg_collection)


def precompute(cfg, progress: bool = True, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
               logprob_dtype: str = "fp16", kind: str = "top_p_k", draws: int = 12, compression: Optional[str] = None,
               shard_task: int = 0, shard_tasks: int = 1, temperatures: Optional[Sequence[float]] = None) -> Optional[dict]:
    """Write run ``cfg``'s teacher targets to ``cfg.teacher.store`` (collective over all ranks);
    returns the manifest. Resumes a store begun for the same plan; refuses one made for another.
    ``kind="rskd"`` stores ``draws`` samples per position (seeded by ``training.seed``) instead of
    the top-p-k truncation.
    ``temperatures`` (``store.temperatures.store_temperatures``; None: the τ the run's KD steps
    take): top-p-k stores also record the truncated ids' tempered mass at each τ ≠ 1, which a
    ghost-bucket student at that τ needs; RS-KD draws are made at the one temperature given.
    ``shard_task`` of ``shard_tasks`` (a job array's task): only that task's shares of the shards
    (:func:`task_shards`) are computed; the manifest is written if every shard is then present, and
    None is returned while other tasks' shards are still missing."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megadistill.config import CHECKPOINT_MODEL_PREFIX, data_seed, run_vocab_size
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.gpt import build_gpt, device
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.store import writer
    from megadistill.megatron.distributed import init_distributed

    if cfg.teacher.store is None:
        raise ConfigError("teacher.store is required: the directory the precomputed logits are written to")
    if cfg.teacher.checkpoint is None:
        raise ConfigError("teacher.checkpoint is required to precompute logits (the teacher's weights)")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ConfigError(f"log-prob encoding {logprob_dtype!r} is not one of {tuple(LOGPROB_DTYPES)}")
    if compression not in (None, "zstd"):
        raise ConfigError(f"store compression {compression!r} is not one of None, 'zstd'")
    if kind not in KINDS:
        raise ConfigError(f"store format {kind!r} is not one of {KINDS}")
    if kind == "rskd" and not 1 <= draws < 2**20:
        raise ConfigError(f"RS-KD draws per position must be in [1, 2**20), got {draws}")
    if samples_per_shard < 1:
        raise ConfigError(f"samples per shard must be >= 1, got {samples_per_shard}")
    temps = store_temperatures(kind, temperatures, KnobSchedule(cfg).kd_temperatures(), cfg.kd.truncation,
                               "precompute-logits --temperatures")
    tail_temps = tuple(t for t in temps if t != 1.0) if kind == "top_p_k" else ()
    if shard_tasks < 1 or not 0 <= shard_task < shard_tasks:
        raise ConfigError(f"shard task {shard_task} of {shard_tasks}: need shard tasks >= 1 and 0 <= shard task < shard tasks")
    pp = cfg.parallel.pipeline_model_parallel_size
    if cfg.teacher.model.num_layers % pp:
        raise ConfigError(f"teacher.model.num_layers {cfg.teacher.model.num_layers} is not divisible by "
                          f"parallel.pipeline_model_parallel_size {pp}: each pipeline stage holds an equal share of the teacher's layers")
    init_distributed(cfg)
    tokenizer, train_ds, _, tok_path = prepare_data(cfg)
    vocab = run_vocab_size(cfg, tokenizer.vocab_size)
    ckpt = _on_rank0(lambda: resolve_teacher_checkpoint(cfg.teacher.checkpoint))
    teacher = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, vocab), ckpt, CHECKPOINT_MODEL_PREFIX,
                                             vocab_size=tokenizer.vocab_size))
    store = Path(cfg.teacher.store)
    d = cfg.data
    dataset = {
        "data_prefix": str(Path(d.data_prefix).resolve()) if d.data_prefix else None,
        "inputs": list(d.inputs) if d.inputs else None,
        "num_documents": int(len(train_ds.dataset.sequence_lengths)),
        "seed": data_seed(cfg), "seq_length": d.seq_length, "split": d.split,
    }

    def begin():
        plan = _plan(cfg, Path(ckpt), file_sha256(tok_path), dataset, vocab, samples_per_shard, logprob_dtype,
                     kind, draws, compression, temps)
        if writer.read_manifest(store) is not None and writer.read_manifest(store).get("identity") == plan["identity"]:
            writer.begin(store, plan)  # checks the rest of the plan too
            return plan, None
        writer.begin(store, plan)
        return plan, sorted(writer.finished_shards(store, plan))

    plan, done = _on_rank0(begin)
    if done is None:  # already complete
        return writer.read_manifest(store)
    done = set(done)

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    # One writer per data-parallel replica: the last pipeline stage (it has the logits), TP rank 0
    # (the selection is replicated over the TP group). Which ranks exist does not change the bytes.
    last_stage = parallel_state.is_pipeline_last_stage()
    writes = last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
    kd = cfg.kd.loss_config()
    dev = device()
    ranges = writer.shard_ranges(plan["num_samples"], samples_per_shard)
    # This task's shards still to do, dealt round-robin to the data-parallel replicas.
    todo = [i for i in task_shards(len(ranges), shard_task, shard_tasks) if i not in done]
    mine = todo[dp_rank::dp]
    todo_tokens = sum(ranges[i][1] for i in todo) * d.seq_length
    bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"precompute {store.name}",
               disable=not progress or dist.get_rank() != 0, dynamic_ncols=True)

    def select(mb, logits, samples):
        """Last stage: the targets of one micro-batch's ``logits[b, s, v/tp]`` into ``samples``."""
        b, s = mb["tokens"].shape
        flat = logits.reshape(b * s, -1)
        if kind == "rskd":
            u = rskd_uniforms(cfg.training.seed, np.repeat(np.arange(mb["first"], mb["first"] + b), s), np.tile(np.arange(s), b), draws)
            ids, vals = sample_rskd(flat, torch.from_numpy(u), group, temperature=temps[0])
            res = tails = None
        else:
            ids, vals, res, tails = select_top_p_k(flat, kd, group, tail_temps)
        if not writes:  # the TP peers only took part in the collectives
            return
        ids, vals = ids.reshape(b, s, -1).cpu().numpy(), vals.reshape(b, s, -1).cpu().numpy()
        res = None if res is None else res.reshape(b, s).cpu().numpy()
        tails = None if tails is None or not tail_temps else tails.reshape(b, s, -1).cpu().numpy()
        for j in range(b):
            valid = ids[j] >= 0
            if kind == "rskd":
                samples.append(SampleTargets(mb["hashes"][j], valid.sum(-1), None, ids[j][valid], None, draws=vals[j][valid]))
            else:
                samples.append(SampleTargets(mb["hashes"][j], valid.sum(-1), res[j], ids[j][valid], vals[j][valid],
                                             tails=None if tails is None else tails[j]))

    with torch.no_grad():
        for i in mine:
            first, count = ranges[i]
            samples: list[SampleTargets] = []
            for run in _micro_batches(train_ds, first, count, d.micro_batch_size, dev):
                teacher_forwards(teacher, run, d.seq_length, partial(select, samples=samples))
                bar.update(sum(mb["tokens"].numel() for mb in run) * dp)
            if writes:
                writer.write_atomic(store / shard_name(i), encode_shard(first, samples, d.seq_length, vocab, logprob_dtype,
                                                                        kind, draws if kind == "rskd" else None,
                                                                        compression=compression,
                                                                        tail_temperatures=tail_temps,
                                                                        draw_temperature=temps[0] if kind == "rskd" else 1.0))
    bar.close()
    dist.barrier()

    def complete():
        # Another array task may still be writing its shards: the one that finds them all present
        # and verified by their content writes the manifest. Two tasks finishing together both
        # write it, with the same bytes (it derives from the plan and the shards only), each by an
        # atomic rename. A damaged shard stops the manifest: the task that owns it recomputes it.
        verified, damaged = writer.verified_shards(store, plan)
        if damaged:
            i = min(damaged)
            more = f" (and {len(damaged) - 1} more shards)" if len(damaged) > 1 else ""
            task = f" with --shard-task {i % shard_tasks} --shard-tasks {shard_tasks}" if shard_tasks > 1 else ""
            raise StoreError(f"logits store {store}: {shard_name(i)} is not trusted: {damaged[i]}{more}; "
                             f"run precompute-logits again{task} to compute it again")
        if len(verified) < len(ranges):
            return None
        return writer.finish(store, plan, verified)

    return _on_rank0(complete)
