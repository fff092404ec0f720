"""``megadistill slurm render`` (the scripts, the checked-in examples in sync) and a real
single-node SLURM cluster (Debian's slurmctld/slurmd/munge, private directories and ports):
rendered jobs train on 2 ranks, two jobs share the node, ``scancel --signal=TERM`` stops a run
with a checkpoint and a resubmission reproduces the uninterrupted run's losses exactly, a TP=2 job
reproduces a 1-task TP=1 job's losses, and a precompute job array writes a store that verifies."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from tiny_runs import RESUME_STEPS as STEPS
from tiny_runs import ROOT, assert_same_losses, complete_checkpoints, run_metrics, tiny_run_yaml

from megadistill.config import ConfigError
from megadistill.preemption import EXIT_STOPPED
from megadistill.slurm import EXAMPLES, Job, render, render_example, write


# --------------------------------------------------------------------------- rendering


def _sbatch_options(text: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, flags=re.M))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_checked_in_examples_are_what_render_writes(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name their run files relative to the repository
    assert (ROOT / "slurm" / name).read_text() == render_example(name), (
        f"slurm/{name} is out of date: regenerate it with `{__import__('megadistill.slurm').slurm.example_command(name)}`"
    )


def test_render_derives_the_job_from_the_run(tmp_path, corpus):
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    text = render("train", str(cfg), Job(nodes=2, gpus_per_node=4, partition="gpu", time="1:00:00", account="kd",
                                         cpus_per_task=6, signal_seconds=120), overrides=["data.micro_batch_size=1"])
    assert f"-m megadistill train {cfg} data.micro_batch_size=1 --no-progress" in text
    opts = _sbatch_options(text)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "4" and opts["gpus-per-node"] == "4"
    assert opts["cpus-per-task"] == "6" and opts["partition"] == "gpu" and opts["account"] == "kd"
    assert opts["signal"] == "B:USR1@120" and "#SBATCH --requeue" in text and opts["open-mode"] == "append"
    assert opts["output"] == f"{tmp_path / 'out'}/slurm/%x-%j.out"
    assert "unset RANK WORLD_SIZE" in text and "SLURM_JOB_ID % 10000" in text
    assert f'"$stop" = USR1 ] && [ "$status" -eq {EXIT_STOPPED} ]' in text
    cpu = _sbatch_options(render("train", str(cfg), Job(nodes=1, gpus_per_node=0, tasks_per_node=2)))
    assert "gpus-per-node" not in cpu and cpu["ntasks-per-node"] == "2"
    for kind, sub in (("precompute", "precompute-logits"), ("score", "score-data")):
        assert f"-m megadistill {sub} " in render(kind, str(cfg), Job(nodes=1, gpus_per_node=1))
    array = _sbatch_options(render("precompute", str(cfg), Job(nodes=1, gpus_per_node=1, array=3)))
    assert array["array"] == "0-2" and array["output"] == f"{tmp_path / 'out'}/slurm/%x-%A_%a.out"
    assert "array" not in _sbatch_options(render("precompute", str(cfg), Job(nodes=1, gpus_per_node=1)))
    with pytest.raises(ConfigError, match="--array is for --kind precompute"):
        render("train", str(cfg), Job(nodes=1, gpus_per_node=1, array=2))
    with pytest.raises(ConfigError, match="--array must be >= 1"):
        render("precompute", str(cfg), Job(nodes=1, gpus_per_node=1, array=0))


def test_the_summary_line_says_how_the_run_ended():
    from megadistill.metrics import summary_line

    line = summary_line("r", "stopped by SIGTERM (exit 75: resubmit to resume)", 9, 14, 4, 5.12345, (7, 5.5), 61.04,
                        5 * 256, 2.0, "/o/checkpoints/step_00000009")
    assert line == ("r: run summary: stopped by SIGTERM (exit 75: resubmit to resume) | steps 9/14 (resumed from 4) | "
                    "loss 5.1235 | val 5.5000 at step 7 | wall-clock 61.0 s | 640 tok/s | checkpoint /o/checkpoints/step_00000009")
    assert summary_line("r", "finished (exit 0)", 3, 3, 3, None, None, 1.0, 0, 0.0, None).endswith(
        "loss - | val - | wall-clock 1.0 s | 0 tok/s | no checkpoint")


def test_render_refuses_a_layout_the_job_cannot_hold(tmp_path, corpus):
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    # global batch 8 / micro-batch 4: at most DP 2.
    with pytest.raises(ConfigError, match="data.global_batch_size 8 is not divisible"):
        render("train", str(cfg), Job(nodes=1, gpus_per_node=4))
    with pytest.raises(ConfigError, match="--tasks-per-node 3 with --gpus-per-node 2"):
        render("train", str(cfg), Job(nodes=1, gpus_per_node=2, tasks_per_node=3))


def test_write_creates_the_log_directory_and_keeps_foreign_files(tmp_path, corpus):
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    _, path = write("train", str(cfg), Job(nodes=1, gpus_per_node=0, tasks_per_node=2))
    assert path == tmp_path / "out" / "slurm" / "train.sbatch" and os.access(path, os.X_OK)
    write("train", str(cfg), Job(nodes=1, gpus_per_node=0, tasks_per_node=2))  # its own file: re-rendered
    mine = tmp_path / "mine.sbatch"
    mine.write_text("#!/bin/bash\necho mine\n")
    with pytest.raises(ConfigError, match="not overwriting"):
        write("train", str(cfg), Job(nodes=1, gpus_per_node=0), out=str(mine))
    assert mine.read_text() == "#!/bin/bash\necho mine\n"


def test_the_cli_renders(tmp_path, corpus):
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    out = subprocess.run([sys.executable, "-m", "megadistill", "slurm", "render", str(cfg), "--nodes", "1",
                          "--gpus-per-node", "0", "--tasks-per-node", "2", "-o", str(tmp_path / "j.sbatch")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "megadistill slurm render" in (tmp_path / "j.sbatch").read_text()


def test_render_quotes_the_job_name_and_refuses_what_sbatch_cannot_take(tmp_path, corpus):
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    cpu = Job(nodes=1, gpus_per_node=0, tasks_per_node=2)
    # Blanks, ';', quotes and '#' (an unquoted '#' starts a comment in an #SBATCH line) are quoted.
    text = render("train", str(cfg), cpu, overrides=["name='my run; \"x\" #1'"])
    assert '#SBATCH --job-name="my run; \\"x\\" \\#1"\n' in text
    assert _sbatch_options(render("precompute", str(cfg), Job(nodes=1, gpus_per_node=1)))["job-name"] == "out-precompute"
    assert _sbatch_options(render("train", str(cfg), cpu, overrides=["output_dir=" + str(tmp_path / "a b%")]))["output"] \
        == f'"{tmp_path}/a b%%/slurm/%x-%j.out"'  # a literal % of the path is %% in SLURM's log-name pattern
    for override, message in [("name=a/b", r"name: 'a/b' holds a '/', which would put the job log"),
                              ('name="a\\nb"', r"name: 'a\\nb' holds '\\n', which an #SBATCH line cannot hold"),
                              ("name=' '", r"name: ' ' cannot be a SLURM job name")]:
        with pytest.raises(ConfigError, match=message):
            render("train", str(cfg), cpu, overrides=[override])
    with pytest.raises(ConfigError, match=r"--partition: 'gpu\\n' holds"):
        render("train", str(cfg), Job(nodes=1, gpus_per_node=0, partition="gpu\n"))


@pytest.mark.parametrize("time, seconds", [("90", 5400), ("90:30", 5460), ("2:03:04", 7440), ("1-2", 93600),
                                           ("1-2:30", 95400), ("1-2:30:15", 95460), ("0", None), ("INFINITE", None),
                                           ("unlimited", None)])
def test_time_limits_in_every_format_sbatch_takes(time, seconds, tmp_path, corpus):
    from megadistill.slurm import time_limit_seconds

    assert time_limit_seconds(time) == seconds  # rounded up to whole minutes, as SLURM does
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    assert _sbatch_options(render("train", str(cfg), Job(nodes=1, gpus_per_node=0, time=time)))["time"] == time


def test_time_limits_sbatch_would_refuse_are_refused(tmp_path, corpus):
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    for bad in ("1h", "24:00:00:00", "1-", "-5", "1:2:3-4", "", " 10", "1.5"):
        with pytest.raises(ConfigError, match=r"--time: .* is not a SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH"):
            render("train", str(cfg), Job(nodes=1, gpus_per_node=0, time=bad))
    # The stop signal must come before the limit: 4 minutes, USR1 300 s before it.
    with pytest.raises(ConfigError, match=r"--time 4 \(240 s, in whole minutes\) is not longer than --signal-seconds 300"):
        render("train", str(cfg), Job(nodes=1, gpus_per_node=0, time="4"))
    render("train", str(cfg), Job(nodes=1, gpus_per_node=0, time="4", signal_seconds=60))


def test_render_refuses_an_output_it_cannot_write_before_writing_anything(tmp_path, corpus, capsys, monkeypatch):
    from megadistill.cli import main

    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus)
    (tmp_path / "file").write_text("x")
    render_args = ["slurm", "render", str(cfg), "--nodes", "1", "--gpus-per-node", "0"]
    for out, message in [
        (tmp_path / "file" / "sub" / "j.sbatch",
         f"--output {tmp_path}/file/sub/j.sbatch: cannot create {tmp_path}/file/sub: {tmp_path}/file is a file"),
        (tmp_path, f"--output {tmp_path}: a directory, not a file: give the script's file name"),
    ]:
        assert main([*render_args, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"megadistill: error: {message}") and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()  # not even the log directory
    assert main([*render_args, f"output_dir={tmp_path / 'file' / 'run'}"]) == 2
    assert f"megadistill: error: output_dir {tmp_path}/file/run: cannot create {tmp_path}/file/run/slurm: " \
           f"{tmp_path}/file is a file" in capsys.readouterr().err
    # A directory this user may not write to (as root, os.access says yes to everything: pretend).
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path / "ro" and real_access(p, mode, **kw))
    assert main([*render_args, "-o", str(tmp_path / "ro" / "sub" / "j.sbatch")]) == 2
    assert (f"megadistill: error: --output {tmp_path}/ro/sub/j.sbatch: cannot create {tmp_path}/ro/sub: {tmp_path}/ro "
            "is not writable (permission denied)") in capsys.readouterr().err
    assert main([*render_args, "-o", str(tmp_path / "ro" / "j.sbatch")]) == 2
    assert f"--output {tmp_path}/ro/j.sbatch: cannot write to {tmp_path}/ro: permission denied" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and list((tmp_path / "ro").iterdir()) == []


# --------------------------------------------------------------------------- a real cluster


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_by_pid_file(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 15
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class Cluster:
    """A single-node SLURM cluster in ``root`` (see DESIGN.md, "SLURM, for real, on one machine")."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        r = self.root
        (r / "spool").mkdir()
        (r / "state").mkdir()
        key = r / "munge.key"
        self._run(["mungekey", "--create", f"--keyfile={key}"])
        key.chmod(0o600)
        self._run(["munged", "--force", f"--socket={r / 'munge.sock'}", f"--key-file={key}",
                   f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}", f"--seed-file={r / 'munge.seed'}"])
        host = socket.gethostname()
        node = self._run(["slurmd", "-C"]).stdout.splitlines()[0]
        memory = int(re.search(r"RealMemory=(\d+)", node).group(1)) * 9 // 10
        # The node's own topology line, less memory than it reports (more would drain the node).
        node = re.sub(r"RealMemory=\d+", f"RealMemory={memory}", node)
        node = re.sub(r"^NodeName=\S+", f"NodeName={host}", node)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=megadistilltest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r / 'munge.sock'}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=2000",
            "MinJobAge=4", "KillWait=30", "SchedulerType=sched/builtin",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2",  # two 2-task jobs share the 2 cores
            "",
        ]))
        self._run(["slurmctld", "-c", "-i", "-f", str(self.conf)])
        self._run(["slurmd", "-f", str(self.conf), "-N", host])
        deadline = time.time() + 40
        while time.time() < deadline:
            for daemon in ("slurmctld", "slurmd"):
                if not self._running(daemon):
                    raise RuntimeError(f"{daemon} exited: {self._tail(daemon + '.log')}")
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not become idle (sinfo: {state!r}); slurmd.log: {self._tail('slurmd.log')}; "
                           f"slurmctld.log: {self._tail('slurmctld.log')}")

    def stop(self) -> None:
        for name in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _stop_by_pid_file(self.root / name)

    def _running(self, daemon: str) -> bool:
        try:
            return _alive(int((self.root / f"{daemon}.pid").read_text().strip()))
        except (OSError, ValueError):
            return True  # not yet written: still starting

    def _tail(self, name: str) -> str:
        try:
            return " | ".join((self.root / name).read_text().splitlines()[-5:])
        except OSError:
            return "(none)"

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def submit(self, script: Path, cwd: Path, env: dict, args: tuple = ()) -> tuple[subprocess.Popen, int]:
        """``sbatch --wait --parsable script args``: the waiting process and the (array) job id."""
        proc = subprocess.Popen(["sbatch", "--wait", "--parsable", str(script), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd, env={**self.env, **env})
        line = proc.stdout.readline().strip()
        if not line.split(";")[0].isdigit():
            proc.wait()
            raise AssertionError(f"sbatch failed: {line} {proc.stderr.read()}")
        return proc, int(line.split(";")[0])


@pytest.fixture(scope="module")
def cluster():
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)} missing; apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("a private SLURM cluster needs root (slurmd starts jobs as their user)")
    # Short: munge's socket path must fit in a sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="mdslurm-"))
    c = Cluster(root)
    try:
        try:
            c.start()
        except (RuntimeError, subprocess.TimeoutExpired, AttributeError) as e:
            pytest.skip(f"the SLURM daemons did not start here: {e}")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _job_log(out: Path, job: int) -> str:
    logs = list((out / "slurm").glob(f"*-{job}.out"))
    return logs[0].read_text() if logs else "(no job log)"


def _limit_seconds(shown: str):
    """squeue's ``%l`` ([days-]hours:minutes:seconds, or UNLIMITED) in seconds (None: no limit)."""
    if shown == "UNLIMITED":
        return None
    days, _, clock = shown.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return ((int(days or 0) * 24 + parts[0]) * 60 + parts[1]) * 60 + parts[2]


def test_sbatch_takes_the_quoted_job_name_and_the_time_formats_render_accepts(tmp_path, corpus, cluster):
    """What the rendering tests assume, asked of this SLURM's own sbatch (held jobs, never run): the
    quoted #SBATCH --job-name comes back whole and names the log, each --time format means what
    ``time_limit_seconds`` says, and formats it refuses sbatch refuses too."""
    from megadistill.slurm import time_limit_seconds

    name = "my run; \"x\" #1 \\ 'y' %x"
    run = yaml.safe_load(tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "out", corpus).read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**run, "name": name}))
    script = write("train", str(tmp_path / "run.yaml"), Job(nodes=1, gpus_per_node=0, python=sys.executable,
                                                            time="1-2:30:15"))[1]
    held = []

    def submit(*args) -> subprocess.CompletedProcess:
        r = subprocess.run(["sbatch", "--hold", "--parsable", *args, str(script)], capture_output=True, text=True,
                           cwd=tmp_path, env=cluster.env)
        if r.returncode == 0:
            held.append(r.stdout.strip().split(";")[0])
        return r

    def squeue(job: str, fmt: str) -> str:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", fmt], capture_output=True, text=True, env=cluster.env,
                              check=True).stdout.rstrip("\n")

    try:
        assert submit().returncode == 0
        assert squeue(held[0], "%j") == name
        assert _limit_seconds(squeue(held[0], "%l")) == time_limit_seconds("1-2:30:15") == 95460
        shown = subprocess.run(["scontrol", "show", "job", held[0]], capture_output=True, text=True, env=cluster.env,
                               check=True).stdout
        assert f"StdOut={tmp_path / 'out' / 'slurm' / name}-{held[0]}.out\n" in shown, shown
        for time in ("90", "90:30", "2:03:04", "1-2", "1-2:30", "1-2:30:15", "0", "INFINITE", "unlimited"):
            r = submit(f"--time={time}")
            assert r.returncode == 0, (time, r.stderr)
            assert _limit_seconds(squeue(held[-1], "%l")) == time_limit_seconds(time), time
        for bad in ("1h", "1.5", "24:00:00:00"):
            r = submit(f"--time={bad}")
            assert r.returncode != 0 and "time" in r.stderr.lower(), (bad, r.stdout, r.stderr)
    finally:
        if held:
            subprocess.run(["scancel", *held], env=cluster.env)


def test_rendered_jobs_train_share_the_node_and_resume_after_scancel(tmp_path, corpus, cluster):
    job = Job(nodes=1, gpus_per_node=0, tasks_per_node=2, python=sys.executable)
    runs = {}
    for name in ("full", "stopped"):
        cfg = tiny_run_yaml(tmp_path / f"{name}.yaml", tmp_path / name, corpus)
        runs[name] = write("train", str(cfg), job)[1]
    # Leftovers of a submitting shell that used to make both tasks rank 0 of 1 on port 29500.
    env = {"OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    full, full_id = cluster.submit(runs["full"], tmp_path, env)
    stopped, stopped_id = cluster.submit(runs["stopped"], tmp_path, env)  # both on the node at once
    try:
        deadline = time.time() + 120
        while time.time() < deadline and stopped.poll() is None and max(run_metrics(tmp_path / "stopped"), default=0) < 3:
            time.sleep(0.05)
        # As scancel --signal=TERM (or a preemption) does: SIGTERM to every task of the job's steps.
        subprocess.run(["scancel", "--signal=TERM", str(stopped_id)], check=True, env=cluster.env)
        assert stopped.wait(timeout=120) == EXIT_STOPPED, _job_log(tmp_path / "stopped", stopped_id)
        assert full.wait(timeout=180) == 0, _job_log(tmp_path / "full", full_id)
    finally:
        for p, j in ((full, full_id), (stopped, stopped_id)):
            if p.poll() is None:
                subprocess.run(["scancel", str(j)], env=cluster.env)
                p.wait(timeout=60)
    full_log, stopped_log = _job_log(tmp_path / "full", full_id), _job_log(tmp_path / "stopped", stopped_id)
    # Each job its own rendezvous port, and SLURM's ranks, not the inherited RANK/WORLD_SIZE.
    ports = [re.search(r"rendezvous \S+:(\d+)", log).group(1) for log in (full_log, stopped_log)]
    assert ports[0] != ports[1] and "29500" not in ports, ports
    assert "full: 2 ranks = TP 1 x PP 1 x DP 2" in full_log, full_log
    assert f"full: run summary: finished (exit 0) | steps {STEPS}/{STEPS} | loss " in full_log, full_log
    assert f"| checkpoint {tmp_path / 'full' / 'checkpoints' / f'step_{STEPS:08d}'}" in full_log, full_log
    stopped_at = max(run_metrics(tmp_path / "stopped"))
    assert 3 <= stopped_at < STEPS and complete_checkpoints(tmp_path / "stopped") == [stopped_at], stopped_log
    assert f"stopped by SIGTERM at step {stopped_at}" in stopped_log, stopped_log
    assert f"stopped: run summary: stopped by SIGTERM (exit {EXIT_STOPPED}: resubmit to resume) | steps {stopped_at}/{STEPS}" in stopped_log

    resumed, resumed_id = cluster.submit(runs["stopped"], tmp_path, env)
    assert resumed.wait(timeout=180) == 0, _job_log(tmp_path / "stopped", resumed_id)
    resumed_log = _job_log(tmp_path / "stopped", resumed_id)
    assert f"stopped: resuming from step {stopped_at}" in resumed_log, resumed_log
    assert f"stopped: run summary: finished (exit 0) | steps {STEPS}/{STEPS} (resumed from {stopped_at})" in resumed_log
    assert_same_losses(run_metrics(tmp_path / "stopped"), run_metrics(tmp_path / "full"))


def test_the_time_limit_signal_stops_the_run_and_requeues_the_job(tmp_path, corpus, cluster):
    # What --signal=B:USR1@<s> does before the time limit, sent now: USR1 to the batch shell only.
    cfg = tiny_run_yaml(tmp_path / "run.yaml", tmp_path / "run", corpus)
    script = write("train", str(cfg), Job(nodes=1, gpus_per_node=0, tasks_per_node=2, python=sys.executable))[1]
    proc, job_id = cluster.submit(script, tmp_path, {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and max(run_metrics(tmp_path / "run"), default=0) < 3:
            time.sleep(0.05)
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job_id)], check=True, env=cluster.env)
        deadline, shown = time.time() + 90, ""
        while time.time() < deadline:
            shown = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True,
                                   env=cluster.env).stdout
            if re.search(r"Restarts=[1-9]", shown):
                break
            time.sleep(0.3)
        log = _job_log(tmp_path / "run", job_id)
        assert re.search(r"Restarts=[1-9]", shown), (shown, log)  # requeued (it would start again after BeginTime)
    finally:
        subprocess.run(["scancel", str(job_id)], env=cluster.env)
        proc.wait(timeout=60)
    stopped_at = max(run_metrics(tmp_path / "run"))
    assert 3 <= stopped_at < STEPS and complete_checkpoints(tmp_path / "run") == [stopped_at], log
    assert f"stopped by SIGUSR1 at step {stopped_at}" in log and "srun exited with status 75" in log, log


def _wait_all(jobs: dict, out_of: dict, cluster, timeout: float = 240) -> None:
    """Wait for the ``sbatch --wait`` processes ``jobs`` (name -> (process, job id)); each must exit 0
    (else the job's log, found in ``out_of[name]``, is shown). Cancels whatever is left on the way out."""
    try:
        for name, (proc, job_id) in jobs.items():
            logs = lambda: [p.read_text() for p in sorted((out_of[name] / "slurm").glob(f"*-{job_id}*.out"))]  # noqa: E731
            assert proc.wait(timeout=timeout) == 0, (name, proc.stderr.read(), logs())
    finally:
        _cancel(jobs, cluster)


def _cancel(jobs: dict, cluster) -> None:
    """``scancel`` the jobs still running, and wait for their ``sbatch --wait``."""
    for proc, job_id in jobs.values():
        if proc.poll() is None:
            subprocess.run(["scancel", str(job_id)], env=cluster.env)
            proc.wait(timeout=60)


def test_a_tp2_job_reproduces_tp1_and_a_precompute_array_writes_a_verified_store(tmp_path, corpus, cluster):
    from megadistill.store.inspect_store import verify  # what `megadistill store verify` runs

    steps, env = 6, {"OMP_NUM_THREADS": "1"}
    cpu = dict(nodes=1, gpus_per_node=0, python=sys.executable)
    # A checkpoint every 2 steps: the precompute below starts from TP=1's step 2 while both runs go on.
    cfgs = {n: tiny_run_yaml(tmp_path / f"{n}.yaml", tmp_path / n, corpus, steps=steps, save_interval=2) for n in ("tp1", "tp2")}
    jobs = {"tp1": cluster.submit(write("train", str(cfgs["tp1"]), Job(tasks_per_node=1, **cpu))[1], tmp_path, env),
            "tp2": cluster.submit(write("train", str(cfgs["tp2"]), Job(tasks_per_node=2, **cpu),
                                        overrides=["parallel.tensor_model_parallel_size=2"])[1], tmp_path, env)}
    outs = {"tp1": tmp_path / "tp1", "tp2": tmp_path / "tp2", "pre": tmp_path / "pre"}
    try:
        teacher = tmp_path / "tp1" / "checkpoints" / "step_00000002"
        deadline = time.time() + 180
        while time.time() < deadline and jobs["tp1"][0].poll() is None and not (teacher / "COMPLETE").is_file():
            time.sleep(0.1)
        assert (teacher / "COMPLETE").is_file(), _job_log(outs["tp1"], jobs["tp1"][1])
        # That checkpoint as a teacher: 2 steps x 8 samples in 4 shards of 4, over a job array of 2
        # one-rank tasks (2 shards each).
        pre = yaml.safe_load(tiny_run_yaml(tmp_path / "pre.yaml", outs["pre"], corpus, steps=2).read_text())
        pre["teacher"] = {**pre["teacher"], "mode": "offline", "model": pre["model"], "checkpoint": str(teacher),
                          "store": str(tmp_path / "store")}
        pre["kd"] = {**pre["kd"], "top_p": 0.9, "top_k": 8}
        (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
        array = write("precompute", str(tmp_path / "pre.yaml"), Job(tasks_per_node=1, array=2, **cpu))[1]
        jobs["pre"] = cluster.submit(array, tmp_path, env, args=("--samples-per-shard", "4"))
    except BaseException:
        _cancel(jobs, cluster)
        raise
    _wait_all(jobs, outs, cluster)

    tp2_log = _job_log(outs["tp2"], jobs["tp2"][1])
    assert "tp2: 2 ranks = TP 2 x PP 1 x DP 1" in tp2_log and "tp2: run summary: finished (exit 0)" in tp2_log, tp2_log
    # TP splits the matmuls and reduces partial sums: the same run up to rounding (seen here: ~3e-7).
    ref, got = run_metrics(outs["tp1"]), run_metrics(outs["tp2"])
    assert set(got) == set(ref) == set(range(1, steps + 1))
    for step in ref:
        for key in ("total loss", "lm loss", "grad_norm") + (("val_loss",) if step == steps else ()):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key, got[step][key], ref[step][key])

    logs = sorted((outs["pre"] / "slurm").glob(f"*-{jobs['pre'][1]}_*.out"))
    assert len(logs) == 2, logs
    # Each task did its share; the one that found the set complete wrote the manifest (both, if together).
    texts = [p.read_text() for p in logs]
    assert all("incomplete until the other tasks finish" in t or f"wrote {tmp_path / 'store'}:" in t for t in texts), texts
    assert any(f"wrote {tmp_path / 'store'}: 16 samples, 4 shards" in t for t in texts), texts
    assert verify(tmp_path / "store")  # raises on a missing, damaged or mislabelled shard
    assert [e["file"] for e in json.loads((tmp_path / "store" / "manifest.json").read_text())["shards"]] == \
        [f"shard-{i:06d}.bin" for i in range(4)]
    assert not (tmp_path / "store" / "precompute.json").exists()
