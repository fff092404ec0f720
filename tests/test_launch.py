"""Launch environments -> ranks (megadistill.launch.resolve), and the nccl/gloo choice that refuses
a GPU job whose CUDA is broken. Dicts in, results out: no process group, no SLURM needed.

The SLURM variables below are those a real Debian SLURM 22.05 sets: an sbatch shell has
SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID=0 and SLURM_LOCALID=0 but no SLURM_STEP_* variables; each
srun task adds SLURM_STEP_ID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_NUM_NODES, and
inherits the submitting shell's RANK/WORLD_SIZE.
"""

from __future__ import annotations

import os

import pytest

from megadistill import launch
from megadistill.launch import Launch, LaunchError, apply, choose_backend, gpu_evidence, resolve

# An sbatch --ntasks=4 shell (the batch step), as SLURM writes it.
ALLOCATION = {
    "SLURM_JOB_ID": "4711", "SLURM_JOBID": "4711", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4",
    "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm",
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "4",
}


def srun_task(procid: int, ntasks: int = 4, nodes: int = 1, nodelist: str = "vm", localid: int | None = None, **extra):
    """The environment of task ``procid`` of an srun step inside ALLOCATION."""
    env = dict(ALLOCATION, SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=nodelist)
    env.update(
        SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_PROCID=str(procid), SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NODELIST=nodelist,
        SLURM_LOCALID=str(procid % (ntasks // nodes) if localid is None else localid),
    )
    env.update(extra)
    return env


def torchrun_worker(rank: int, world: int, local: int, **extra):
    env = {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": str(rank // 2), "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400",
    }
    env.update(extra)
    return env


def no_scontrol(nodelist):
    raise AssertionError(f"scontrol must not be called (asked for {nodelist!r})")


def test_a_plain_process_is_a_single_rank_with_a_free_port_picked_at_start():
    got = resolve({}, hostnames=no_scontrol)
    assert got == Launch(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=None, source="single")
    env = {}
    applied = apply(got, env)
    assert 0 < applied.master_port < 65536 and env["MASTER_PORT"] == str(applied.master_port)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert resolve({"MASTER_PORT": "1234"}).master_port == 1234
    # Alone, RANK=0 or WORLD_SIZE=1 still describe one process.
    assert resolve({"WORLD_SIZE": "1"}).world_size == 1 and resolve({"RANK": "0"}).source == "torchrun"


def test_torchrun_ranks_are_trusted():
    got = resolve(torchrun_worker(3, 4, 1), hostnames=no_scontrol)
    assert got == Launch(rank=3, local_rank=1, world_size=4, master_addr="10.0.0.5", master_port=29400, source="torchrun")


def test_torchrun_inside_an_srun_step_wins_over_the_step():
    # srun --ntasks-per-node=1 torchrun --nproc-per-node 2 ...: the step has 2 tasks, torchrun 4 ranks.
    env = {**srun_task(1, ntasks=2, nodes=2, nodelist="gpu[1-2]"), **torchrun_worker(3, 4, 1)}
    got = resolve(env, hostnames=no_scontrol)
    assert (got.rank, got.world_size, got.local_rank, got.source) == (3, 4, 1, "torchrun")


def test_other_env_launchers_outside_slurm_are_trusted():
    got = resolve({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert (got.rank, got.world_size, got.local_rank, got.master_port, got.source) == (1, 2, 0, 29500, "torchrun")


def test_an_srun_step_on_one_node():
    got = resolve(srun_task(2), hostnames=no_scontrol)
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.source) == (2, 2, 4, "127.0.0.1", "srun")
    # The port is derived from the job and step ids: the same on every task, different between jobs.
    assert got.master_port == 20000 + (10 * 4711 + 0) % 10000
    assert resolve(srun_task(0)).master_port == got.master_port
    assert resolve(srun_task(0, SLURM_JOB_ID="4712")).master_port != got.master_port
    assert resolve(srun_task(0, SLURM_STEP_ID="1")).master_port != got.master_port
    # What the sbatch template exports wins.
    assert resolve(srun_task(2, MASTER_ADDR="vm", MASTER_PORT="29500")).master_port == 29500


def test_a_multi_node_srun_step_takes_rank_0s_host_from_the_step_nodelist():
    asked = []

    def expand(nodelist):
        asked.append(nodelist)
        return ["gpu07", "gpu08", "gpu09"]

    got = resolve(srun_task(13, ntasks=24, nodes=3, nodelist="gpu[07-09]"), hostnames=expand)
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.source) == (13, 5, 24, "gpu07", "srun")
    assert asked == ["gpu[07-09]"]
    # A MASTER_ADDR exported by the batch script is used as is: no scontrol call.
    got = resolve(srun_task(13, ntasks=24, nodes=3, nodelist="gpu[07-09]", MASTER_ADDR="gpu07-ib"), hostnames=no_scontrol)
    assert got.master_addr == "gpu07-ib"
    # A loopback address inherited from a login shell cannot work across nodes: replaced, and said.
    got = resolve(srun_task(0, ntasks=24, nodes=3, nodelist="gpu[07-09]", MASTER_ADDR="127.0.0.1"), hostnames=expand)
    assert got.master_addr == "gpu07" and any("MASTER_ADDR=127.0.0.1" in n for n in got.notes)


def test_stale_rank_and_world_size_inside_an_srun_step_lose_to_the_step():
    # sbatch passes the submitting shell's RANK=0 WORLD_SIZE=1 to every task (seen with real SLURM).
    for procid in range(4):
        got = resolve(srun_task(procid, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"), hostnames=no_scontrol)
        assert (got.rank, got.world_size, got.local_rank, got.source) == (procid, 4, procid, "srun")
        assert len(got.notes) == 1 and "ignored RANK=0, WORLD_SIZE=1" in got.notes[0]
    # Values that agree with the step are not worth a note.
    assert resolve(srun_task(1, RANK="1", WORLD_SIZE="4")).notes == ()


def test_stale_world_size_next_to_a_one_task_step_is_ambiguous():
    with pytest.raises(LaunchError, match=r"RANK=1, WORLD_SIZE=2 are set but this srun step has a single task"):
        resolve(srun_task(0, ntasks=1, RANK="1", WORLD_SIZE="2"))
    assert resolve(srun_task(0, ntasks=1)).world_size == 1


def test_an_allocation_without_srun_is_refused():
    with pytest.raises(LaunchError) as e:
        resolve(ALLOCATION, hostnames=no_scontrol)
    message = str(e.value)
    assert "inside a SLURM allocation of 4 tasks" in message and "SLURM_NTASKS=4" in message
    assert "not in an srun step: launch with `srun python -m megadistill train ...` or torchrun" in message
    assert launch.world_size({**ALLOCATION, **torchrun_worker(0, 4, 0)}) == 4  # torchrun in the allocation
    # The submitting shell's RANK=0 WORLD_SIZE=1 (sbatch exports them) do not make it a launch...
    with pytest.raises(LaunchError, match="inside a SLURM allocation of 4 tasks"):
        resolve({**ALLOCATION, "RANK": "0", "WORLD_SIZE": "1"})
    # ...but a launcher of one's own that set several ranks is trusted.
    assert resolve({**ALLOCATION, "RANK": "1", "WORLD_SIZE": "4"}).rank == 1


@pytest.mark.parametrize("tasks", ["1", None])
def test_a_one_task_allocation_without_srun_is_a_single_process(tasks):
    env = dict(ALLOCATION)
    env.pop("SLURM_NTASKS")
    if tasks is not None:
        env["SLURM_NTASKS"] = tasks
    got = resolve(env, hostnames=no_scontrol)
    assert (got.world_size, got.rank, got.source) == (1, 0, "single")


@pytest.mark.parametrize("env, message", [
    ({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK and WORLD_SIZE not set although LOCAL_WORLD_SIZE=2 is"),
    ({"WORLD_SIZE": "4"}, r"RANK not set although WORLD_SIZE=4 is"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"rank 2 is outside 0..1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
], ids=["markers-without-ranks", "world-without-rank", "not-an-int", "rank-too-big", "bad-port"])
def test_inconsistent_environments_name_the_variable(env, message):
    with pytest.raises(LaunchError, match=message):
        resolve(env)


def test_multi_node_step_without_a_node_list_asks_for_master_addr():
    env = srun_task(0, ntasks=4, nodes=2)
    for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        env.pop(k)
    with pytest.raises(LaunchError, match="spans 2 nodes but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"):
        resolve(env)


def test_resolve_reads_os_environ_by_default_and_never_writes_it(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") or k in launch.TORCHRUN_MARKERS:
            monkeypatch.delenv(k)
    for k, v in srun_task(1, ntasks=2).items():
        monkeypatch.setenv(k, v)
    before = dict(os.environ)
    assert launch.world_size() == 2 and resolve().rank == 1
    assert dict(os.environ) == before


# --------------------------------------------------------------------------- nccl or gloo


def test_cuda_means_nccl_and_no_gpu_means_gloo():
    assert choose_backend({}, cuda_available=True) == "nccl"
    assert choose_backend({}, cuda_available=False) == "gloo"
    # Hidden on purpose, or SLURM saying the job got no GPU.
    for hidden in ("", "-1", "NoDevFiles"):
        assert choose_backend({"CUDA_VISIBLE_DEVICES": hidden}, cuda_available=False) == "gloo"
    assert choose_backend({"SLURM_GPUS_ON_NODE": "0"}, cuda_available=False) == "gloo"


@pytest.mark.parametrize("env, shown", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
    ({"SLURM_GPUS_PER_NODE": "8"}, "SLURM_GPUS_PER_NODE=8"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"MEGADISTILL_DIST_BACKEND": "nccl"}, "MEGADISTILL_DIST_BACKEND=nccl"),
], ids=["cuda-visible", "slurm-job-gpus", "slurm-gpus-per-node", "slurm-gpus-on-node", "asked-for-nccl"])
def test_a_gpu_job_with_broken_cuda_is_refused_rather_than_run_on_gloo(env, shown):
    with pytest.raises(LaunchError) as e:
        choose_backend(env, cuda_available=False)
    message = str(e.value)
    assert shown in message and "torch.cuda.is_available() is False" in message
    assert "refusing to train on CPU/gloo" in message and "MEGADISTILL_DIST_BACKEND=gloo" in message


def test_gloo_can_be_chosen_deliberately():
    env = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "0", "MEGADISTILL_DIST_BACKEND": "gloo"}
    assert choose_backend(env, cuda_available=False) == "gloo"
    with pytest.raises(LaunchError, match=r"MEGADISTILL_DIST_BACKEND='mpi' is not one of nccl, gloo"):
        choose_backend({"MEGADISTILL_DIST_BACKEND": "mpi"}, cuda_available=False)
    # Forcing gloo where CUDA works would leave the models on the GPU, reduced by gloo: refused.
    with pytest.raises(LaunchError, match="MEGADISTILL_DIST_BACKEND=gloo but CUDA is available"):
        choose_backend({"MEGADISTILL_DIST_BACKEND": "gloo"}, cuda_available=True)


def test_gpu_evidence_lists_every_variable():
    env = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "0", "SLURM_GPUS": "a100:1", "PATH": "/bin"}
    assert gpu_evidence(env) == ["CUDA_VISIBLE_DEVICES=0", "SLURM_GPUS=a100:1", "SLURM_STEP_GPUS=0"]


# --------------------------------------------------------------------------- the CPU layer's policy


def test_cpu_layer_only_for_gloo_without_cuda_and_only_on_supported_megatron_core(monkeypatch):
    from megadistill.megatron import cpu
    from megadistill.testing import cpu_patches

    assert cpu_patches is cpu and cpu_patches.apply is cpu.apply  # the tests' alias
    assert cpu.needed("gloo", cuda_available=False)
    assert not cpu.needed("nccl", cuda_available=False) and not cpu.needed("gloo", cuda_available=True)
    for version in ("0.16.1", "0.16.0", "0.19.2", "0.19.0", "0.19.2+4f1c2aa"):
        cpu.check_megatron_version(version, env={})
    cpu.check_megatron_version()  # the installed one
    supported = r"supports megatron-core 0.16.x or 0.19.x, but megatron-core"
    with pytest.raises(cpu.UnsupportedMegatronVersion, match=supported + r" 0.17.0 is installed \(0.17/0.18 are expected"):
        cpu.check_megatron_version("0.17.0", env={})
    with pytest.raises(cpu.UnsupportedMegatronVersion, match=supported + " 0.20.0 is installed: its CUDA-only call sites"):
        cpu.check_megatron_version("0.20.0", env={})
    with pytest.raises(LaunchError, match="MEGADISTILL_CPU_ANY_MCORE=1"):
        cpu.check_megatron_version("0.15.3", env={})
    with pytest.warns(UserWarning, match="applying it anyway"):
        cpu.check_megatron_version("0.17.0", env={"MEGADISTILL_CPU_ANY_MCORE": "1"})
