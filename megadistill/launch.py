"""Who this process is in the job: rank, world size and rendezvous, from torchrun, an srun step, or
nothing (a single process). :func:`resolve` is the one place that decides; config validation and
process-group start-up both use it, so a layout validated is the layout launched.

The rules, in order (the environment is only read, never trusted blindly):

1. **torchrun** (or any launcher that sets ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` or
   ``TORCHELASTIC_RUN_ID`` next to ``RANK``/``WORLD_SIZE``): its ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. This holds inside an srun step too
   (``srun torchrun ...``): torchrun's ranks are the real ones.
2. **An srun step** (``SLURM_STEP_ID``, ``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` all set):
   rank ``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``, local rank ``SLURM_LOCALID``. srun passes the
   submitting shell's environment on, so a ``RANK``/``WORLD_SIZE`` found here without torchrun's
   variables is left over from that shell: the step's own values win (the override is reported in
   :attr:`Launch.notes`). Only a one-task step next to a ``WORLD_SIZE`` > 1 is ambiguous (a
   launcher of one's own inside srun, or a stale value?) and raises :class:`LaunchError`.
3. ``RANK`` and ``WORLD_SIZE`` without torchrun's markers and outside any srun step: some other
   env:// launcher (a test harness, a cluster operator); trusted, reported as ``"torchrun"``, unless
   they say a single process inside a multi-task allocation (leftovers, see 4).
4. **Inside a SLURM allocation of several tasks but in no step** (``sbatch``/``salloc`` shell,
   ``SLURM_NTASKS`` > 1): an error. Running there would start one process that believes it is the
   whole job while SLURM reserved N; launch with ``srun`` (or torchrun) instead.
5. Otherwise a single process (also a one-task allocation).

MASTER_ADDR: the environment's if set (``slurm/train.sbatch`` exports one), else, for a multi-node
srun step, the first host of ``SLURM_STEP_NODELIST`` (``SLURM_JOB_NODELIST`` as a fallback),
expanded with ``scontrol show hostnames`` (injectable for tests), else ``127.0.0.1``. A loopback
MASTER_ADDR inherited by a multi-node step cannot work and is replaced the same way.

MASTER_PORT: the environment's if set (scripts from ``megadistill slurm render`` export
``20000 + SLURM_JOB_ID mod 10000``). Otherwise a single-rank run takes a free port when it
starts (:func:`apply`), so concurrent single-process runs on one machine do not clash; an srun step
derives one from its job and step ids, ``20000 + (10 x SLURM_JOB_ID + SLURM_STEP_ID) mod 10000``,
so that jobs sharing a node (and up to ten concurrent steps of one job) use different ports while
every task of the step computes the same one (the range stays below Linux's ephemeral ports,
32768+); any other multi-rank launch uses torch's customary 29500.

:func:`choose_backend` picks nccl or gloo, refusing to fall back to gloo when the job was clearly
given GPUs that torch cannot use.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

# torchrun sets these for every worker, next to RANK/WORLD_SIZE; a shell never has them.
TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE")
# srun sets these for each task of a step; an sbatch/salloc shell has none of the step ones.
SRUN_STEP_VARIABLES = ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")

DEFAULT_PORT = 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000

BACKEND_VARIABLE = "MEGADISTILL_DIST_BACKEND"
"""Set to ``gloo`` to run on CPU deliberately (e.g. despite ``CUDA_VISIBLE_DEVICES``), or ``nccl``
to insist on GPUs."""


class LaunchError(RuntimeError):
    """The process cannot tell (or cannot honour) its place in the job; names the variables."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as :func:`resolve` decided it."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    local_rank: int
    """Rank among the processes of this node (the GPU index with one GPU per process)."""
    world_size: int
    """Number of processes in the job."""
    master_addr: str
    """Host of rank 0's rendezvous store."""
    master_port: Optional[int]
    """Port of that store; None = pick a free port when starting (single-rank runs only)."""
    source: str
    """``torchrun`` (or another env:// launcher), ``srun`` or ``single``."""
    notes: tuple[str, ...] = ()
    """Environment values that were overridden, and why (worth logging once)."""


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist (``node[01-04],gpu7``) with ``scontrol show hostnames``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except FileNotFoundError as e:
        raise LaunchError(
            f"cannot expand the SLURM node list {nodelist!r} to find rank 0's host: scontrol is not on "
            "PATH; set MASTER_ADDR to the first node's host name"
        ) from e
    except subprocess.CalledProcessError as e:
        raise LaunchError(
            f"scontrol show hostnames {nodelist!r} failed ({e.stderr.strip()}); set MASTER_ADDR to the first node's host name"
        ) from e
    return out.stdout.split()


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name, "")
    if raw.strip() == "":
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def _checked(rank: int, local_rank: int, world: int, names: str) -> None:
    if world < 1:
        raise LaunchError(f"world size {world} ({names}) must be >= 1")
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside 0..{world - 1} ({names})")
    if local_rank < 0:
        raise LaunchError(f"local rank {local_rank} ({names}) must be >= 0")


def _port(env: Mapping[str, str], default: Optional[int]) -> Optional[int]:
    if not env.get("MASTER_PORT", "").strip():
        return default
    port = _int(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port")
    return port


def _slurm_port(env: Mapping[str, str]) -> int:
    job, step = (int(env[k]) if env.get(k, "").isdigit() else 0 for k in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
    return SLURM_PORT_BASE + (10 * job + step) % SLURM_PORT_SPAN


def _is_loopback(addr: str) -> bool:
    return addr in ("localhost", "::1") or addr.startswith("127.")


def _from_env_ranks(env: Mapping[str, str], torchrun: bool) -> Launch:
    given = {k: env[k].strip() for k in ("RANK", "WORLD_SIZE") if env.get(k, "").strip()}
    # Alone, RANK=0 or WORLD_SIZE=1 still means one process; anything else needs its partner, and
    # torchrun always sets both.
    if len(given) < 2 and (torchrun or given not in ({"RANK": "0"}, {"WORLD_SIZE": "1"})):
        missing = " and ".join(k for k in ("RANK", "WORLD_SIZE") if k not in given)
        shown = ", ".join(f"{k}={env[k]}" for k in TORCHRUN_MARKERS + tuple(given) if k in env)
        raise LaunchError(f"{missing} not set although {shown} is: an incomplete torchrun-style environment")
    rank, world = _int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1)
    local = _int(env, "LOCAL_RANK", 0)
    _checked(rank, local, world, "RANK / WORLD_SIZE / LOCAL_RANK")
    return Launch(
        rank=rank, local_rank=local, world_size=world,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_port(env, None if world == 1 else DEFAULT_PORT),
        source="torchrun",
    )


def _from_srun(env: Mapping[str, str], hostnames: Callable[[str], Sequence[str]]) -> Launch:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    local = _int(env, "SLURM_LOCALID", 0)
    _checked(rank, local, world, "SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID")
    notes = []
    stale = {k: env[k] for k in ("RANK", "WORLD_SIZE") if env.get(k, "").strip()}
    if stale:
        ours = {"RANK": str(rank), "WORLD_SIZE": str(world)}
        disagree = {k: v for k, v in stale.items() if v.strip() != ours[k]}
        if disagree:
            shown = ", ".join(f"{k}={v}" for k, v in stale.items())
            if world == 1:
                raise LaunchError(
                    f"{shown} are set but this srun step has a single task (SLURM_PROCID={rank}, "
                    f"SLURM_STEP_NUM_TASKS=1) and torchrun's variables ({', '.join(TORCHRUN_MARKERS)}) "
                    "are absent: if they are left over from the submitting shell, unset them; if a launcher "
                    "of your own started these ranks inside the step, have it set LOCAL_WORLD_SIZE too "
                    "(as torchrun does), or use torchrun"
                )
            notes.append(
                f"ignored {shown} from the environment (no torchrun variables; left over from the submitting "
                f"shell?): this srun step says rank {rank} of {world}"
            )
    nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
    addr = env.get("MASTER_ADDR", "")
    if nodes > 1 and _is_loopback(addr):
        notes.append(f"ignored MASTER_ADDR={addr}: a loopback address cannot reach rank 0 from {nodes} nodes")
        addr = ""
    if not addr:
        if nodes > 1:
            nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
            if nodelist is None:
                raise LaunchError(
                    f"this srun step spans {nodes} nodes but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                    "is set: set MASTER_ADDR to the host of rank 0"
                )
            hosts = list(hostnames(nodelist))
            if not hosts:
                raise LaunchError(f"the SLURM node list {nodelist!r} expanded to no host: set MASTER_ADDR")
            # srun's default (block) distribution puts task 0 on the step's first node.
            addr = hosts[0]
        else:
            addr = "127.0.0.1"
    return Launch(
        rank=rank, local_rank=local, world_size=world, master_addr=addr,
        master_port=_port(env, None if world == 1 else _slurm_port(env)),
        source="srun", notes=tuple(notes),
    )


def resolve(
    env: Mapping[str, str] = os.environ,
    hostnames: Callable[[str], Sequence[str]] = scontrol_hostnames,
) -> Launch:
    """This process's :class:`Launch` from the environment ``env`` (read only; see the module
    docstring for the rules). ``hostnames`` expands a SLURM node list; it is called only for a
    multi-node srun step without MASTER_ADDR. Raises :class:`LaunchError` naming the variables."""
    if any(m in env for m in TORCHRUN_MARKERS):
        return _from_env_ranks(env, torchrun=True)
    if all(env.get(v, "").strip() for v in SRUN_STEP_VARIABLES):
        return _from_srun(env, hostnames)
    tasks = _int(env, "SLURM_NTASKS", 1) if env.get("SLURM_JOB_ID") else 1
    if env.get("RANK", "").strip() or env.get("WORLD_SIZE", "").strip():
        got = _from_env_ranks(env, torchrun=False)
        # RANK=0 WORLD_SIZE=1 in a bare multi-task allocation are the submitting shell's leftovers
        # (sbatch exports them), not a launcher: the allocation rule below still applies.
        if got.world_size > 1 or tasks == 1:
            return got
    if tasks > 1:
        raise LaunchError(
            f"inside a SLURM allocation of {tasks} tasks (SLURM_JOB_ID={env['SLURM_JOB_ID']}, SLURM_NTASKS={tasks}) "
            "but not in an srun step: launch with `srun python -m megadistill train ...` or torchrun"
        )
    return Launch(
        rank=0, local_rank=0, world_size=1,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_port(env, None), source="single",
    )


def world_size(env: Mapping[str, str] = os.environ) -> int:
    """The launch's world size (what config validation checks the layout against)."""
    return resolve(env).world_size


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apply(launch: Launch, environ=None) -> Launch:
    """Write ``launch`` into the process environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) as torch.distributed's ``env://`` and DeepSpeed's ``init_distributed`` read it;
    a free port is picked here if ``launch.master_port`` is None. Returns the launch with its port."""
    environ = os.environ if environ is None else environ
    if launch.master_port is None:
        launch = dataclasses.replace(launch, master_port=_free_port())
    environ.update(
        RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port),
    )
    return launch


def gpu_evidence(env: Mapping[str, str] = os.environ) -> list[str]:
    """``VAR=value`` entries showing that this process was given GPUs (empty if none)."""
    found = []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    # "" and "-1" hide every GPU on purpose; SLURM writes NoDevFiles when a job got no GPU gres.
    if visible is not None and visible.strip() not in ("", "-1", "NoDevFiles"):
        found.append(f"CUDA_VISIBLE_DEVICES={visible}")
    for name in sorted(env):
        value = env[name].strip()
        if value in ("", "none", "(null)"):
            continue
        if name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):  # GPU indices: "0" is the first GPU
            found.append(f"{name}={value}")
        elif name.startswith("SLURM_GPUS") and value.rsplit(":", 1)[-1] != "0":  # counts, "[type:]n"
            found.append(f"{name}={value}")
    return found


def _torch_build() -> str:
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__}, " + (f"built for CUDA {cuda}" if cuda else "a CPU-only build")


def choose_backend(env: Mapping[str, str] = os.environ, cuda_available: Optional[bool] = None) -> str:
    """``"nccl"`` with CUDA, ``"gloo"`` without; but a job that was given GPUs torch cannot use
    (CUDA_VISIBLE_DEVICES, SLURM_GPUS*, SLURM_JOB_GPUS, or MEGADISTILL_DIST_BACKEND=nccl) raises
    :class:`LaunchError` rather than silently training on CPU. ``MEGADISTILL_DIST_BACKEND=gloo``
    chooses gloo deliberately where CUDA is unusable; where it works, models and batches live on
    the GPU, which gloo cannot reduce, so that combination raises too (hide the GPUs instead).
    ``cuda_available`` defaults to ``torch.cuda.is_available()``."""
    wanted = env.get(BACKEND_VARIABLE, "").strip().lower()
    if wanted not in ("", "nccl", "gloo"):
        raise LaunchError(f"{BACKEND_VARIABLE}={env[BACKEND_VARIABLE]!r} is not one of nccl, gloo")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if wanted == "gloo":
        if cuda_available:
            raise LaunchError(
                f"{BACKEND_VARIABLE}=gloo but CUDA is available: the models would be on the GPU, which gloo "
                "cannot reduce; to run on CPU, hide the GPUs (CUDA_VISIBLE_DEVICES=) as well"
            )
        return "gloo"
    if cuda_available:
        return "nccl"
    evidence = ([f"{BACKEND_VARIABLE}=nccl"] if wanted == "nccl" else []) + gpu_evidence(env)
    if evidence:
        raise LaunchError(
            f"this job was given GPUs ({'; '.join(evidence)}) but torch cannot use CUDA "
            f"(torch.cuda.is_available() is False; {_torch_build()}): refusing to train on CPU/gloo instead. "
            f"Fix the CUDA driver or torch install, or set {BACKEND_VARIABLE}=gloo to run on CPU deliberately"
        )
    return "gloo"


def init_process_group(launch: Launch, backend: str, timeout=None) -> Launch:
    """Start torch.distributed for ``launch`` with ``backend`` (from :func:`choose_backend`), after
    :func:`apply`; with nccl, first bind this process to GPU ``local_rank`` (modulo the visible
    GPUs: with one GPU per task every task sees its own as device 0). Returns the applied launch."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
            raise LaunchError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the launch environment says rank {launch.rank} of {launch.world_size} ({launch.source})"
            )
        return launch
    launch = apply(launch)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, **kwargs)
    return launch
