"""Tests that need CUDA (marked ``gpu``; on a machine without a GPU they skip with the reason): the KD
losses on CUDA against the float64 CPU reference, a bf16 student with a bf16 online teacher training
on one GPU over NCCL, Transformer Engine's layer spec against the local one on the same checkpoint,
and tensor parallelism over NCCL on two GPUs.

The pytest parent hides CUDA for the whole session (tests/conftest.py), so each test runs its work in
a process of its own that sees the GPUs: this file as a script, ``python test_gpu.py CASE DIR [ARG
...]`` (under ``megadistill torchrun`` for several ranks), which writes what each rank found to
``DIR/result-RANK.json``. The tests assert on those findings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
TE_IMPORTABLE = importlib.util.find_spec("transformer_engine") is not None


def _run(case: str, out: Path, gpu_env: dict, *args: str, nproc: int = 1, timeout: float = 300) -> list[dict]:
    """Run ``case`` in fresh process(es) that see the GPUs; each rank's findings."""
    from megadistill.testing import free_port

    out.mkdir(parents=True, exist_ok=True)
    script = [str(HERE), case, str(out), *args]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "megadistill", "torchrun", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), *script]
    path = os.pathsep.join(filter(None, [str(ROOT), gpu_env.get("PYTHONPATH")]))  # this checkout's megadistill
    env = {**gpu_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, f"{case} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return [json.loads((out / f"result-{rank}.json").read_text()) for rank in range(nproc)]


# --------------------------------------------------------------------------- the tests


def test_kd_losses_on_cuda_match_the_float64_cpu_reference(tmp_path, gpu_env):
    (found,) = _run("kd_loss", tmp_path, gpu_env)
    assert found["device"] == "cuda"
    # Inputs are the same values on both sides (the reference upcasts the bf16/fp32 logits), so only
    # the loss's arithmetic differs: fp64 on CUDA is exact to rounding, fp32 to fp32's, and the bf16
    # case returns its gradient in bf16 (one rounding of each element, 2^-8 relative).
    tolerance = {"float64": (1e-9, 1e-9), "float32": (1e-5, 1e-5), "bfloat16": (1e-5, 8e-3)}
    for dtype, (loss_tol, grad_tol) in tolerance.items():
        for what in ("kd", "fused"):
            loss_err, grad_err = found["errors"][dtype][what]
            assert loss_err <= loss_tol, (dtype, what, loss_err)
            assert grad_err <= grad_tol, (dtype, what, grad_err)
    assert found["cases"] >= 4


def test_bf16_student_and_teacher_train_on_one_gpu(tmp_path, gpu_env, corpus):
    (found,) = _run("bf16_step", tmp_path, gpu_env, corpus.prefix, corpus.tokenizer)
    assert found["backend"] == "nccl" and found["param_device"] == "cuda"
    assert found["student_dtype"] == found["teacher_dtype"] == "torch.bfloat16"
    # transformer_impl auto: Transformer Engine's layers wherever TE is importable on a GPU.
    assert found["layer_spec"] == ("transformer_engine" if TE_IMPORTABLE else "local")
    steps = {int(k): v for k, v in found["steps"].items()}
    assert sorted(steps) == list(range(1, 7))
    for m in steps.values():
        assert all(math.isfinite(m[k]) for k in ("total loss", "lm loss", "kd loss")), m
        assert m["kd loss"] > 0 and m["memory_mib"] > 0, m
    # An untrained model starts near ln(vocab) and six steps at lr 3e-3 bring the LM loss down.
    assert abs(steps[1]["lm loss"] - math.log(found["vocab"])) < 1.0, steps[1]
    assert steps[6]["lm loss"] < steps[1]["lm loss"]
    assert math.isfinite(found["val_loss"]) and found["checkpoint"]


@pytest.mark.skipif(not TE_IMPORTABLE, reason="needs Transformer Engine (transformer_engine is not importable)")
def test_transformer_engine_layers_load_a_local_checkpoint_and_agree(tmp_path, gpu_env):
    # TF32 off in cuBLAS, so both layer specs multiply in full fp32.
    (found,) = _run("te_spec", tmp_path, {**gpu_env, "NVIDIA_TF32_OVERRIDE": "0"})
    assert found["te_module"].startswith("TE"), found["te_module"]
    assert found["max_logprob_diff"] <= 2e-3, found


@pytest.mark.gpu(devices=2)
def test_tensor_parallel_losses_and_training_over_nccl(tmp_path, gpu_env, corpus):
    ranks = _run("nccl", tmp_path, gpu_env, corpus.prefix, corpus.tokenizer, nproc=2, timeout=420)
    for rank, found in enumerate(ranks):
        assert found["backend"] == "nccl" and found["tp"] == 2 and found["device"] == f"cuda:{rank}", found
        for what, err in found["errors"].items():
            assert err <= 1e-5, (rank, what, err)
    steps = {int(k): v for k, v in ranks[-1]["steps"].items()}  # the logging rank
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(m["total loss"]) and m["kd loss"] > 0 for m in steps.values()), steps
    assert steps[4]["lm loss"] < steps[1]["lm loss"]


# --------------------------------------------------------------------------- the cases (script side)


def _device():
    import torch

    # The tests assert "cuda"; CPU only lets a developer without a GPU run the cases by hand.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _max_rel(a, b) -> float:
    """max |a - b| over max(1, max |b|): absolute near 0, relative for large values."""
    return float((a.double().cpu() - b.double().cpu()).abs().max() / max(1.0, float(b.abs().max())))


def case_kd_loss(out: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from kd_reference import reference_dense
    from megadistill.losses import KDLossConfig, vocab_parallel_distillation_loss, vocab_parallel_kd_loss

    dev = _device()
    s, b, v, alpha = 4, 3, 300, 0.3  # v = 300: the argmax's 128-wide blocks and a ragged tail
    configs = [
        KDLossConfig(loss="forward_kl"),
        KDLossConfig(loss="reverse_kl", temperature=2.0),
        KDLossConfig(loss="jsd", jsd_beta=0.3, top_p=0.9, top_k=8, truncation="ghost", chunk_tokens=5),
        KDLossConfig(loss="forward_kl", top_p=0.8, top_k=5, truncation="renormalize", temperature=0.7),
    ]
    errors: dict = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        worst = {"kd": [0.0, 0.0], "fused": [0.0, 0.0]}
        for i, cfg in enumerate(configs):
            g = torch.Generator().manual_seed(100 + i)
            student = (torch.randn(s, b, v, generator=g, dtype=torch.float64) * 2).to(dtype)
            teacher = (torch.randn(s, b, v, generator=g, dtype=torch.float64) * 3).to(dtype)
            labels = torch.randint(0, v, (s, b), generator=g)
            grad_out = torch.rand(s, b, generator=g, dtype=torch.float64) + 0.5
            # The float64 reference on CPU, from the very values the GPU gets.
            full = student.double().reshape(-1, v).requires_grad_(True)
            kd_ref = reference_dense(full, teacher.double().reshape(-1, v), cfg)
            (kd_ref * grad_out.reshape(-1)).sum().backward()
            kd_grad_ref, full.grad = full.grad, None
            fused_ref = (1 - alpha) * F.cross_entropy(full, labels.reshape(-1), reduction="none") + alpha * reference_dense(
                full, teacher.double().reshape(-1, v), cfg)
            (fused_ref * grad_out.reshape(-1)).sum().backward()
            for what, ref, ref_grad in (("kd", kd_ref, kd_grad_ref), ("fused", fused_ref, full.grad)):
                leaf = student.to(dev, copy=True).requires_grad_(True)
                if what == "kd":
                    loss = vocab_parallel_kd_loss(leaf, teacher.to(dev), cfg)
                else:
                    loss = vocab_parallel_distillation_loss(leaf, labels.to(dev), teacher.to(dev), cfg, alpha).total
                assert loss.device.type == dev.type
                loss.backward(grad_out.to(dev, loss.dtype))
                worst[what][0] = max(worst[what][0], _max_rel(loss.detach().reshape(-1), ref.detach()))
                worst[what][1] = max(worst[what][1], _max_rel(leaf.grad.reshape(-1, v), ref_grad))
        errors[str(dtype).removeprefix("torch.")] = worst
    return {"device": dev.type, "errors": errors, "cases": len(configs)}


def _tiny_kd_run(out: Path, prefix: str, tokenizer: str, steps: int, **sections):
    from dataclasses import replace

    from tiny_runs import STUDENT, TEACHER, Corpus, online_kd_run

    cfg = online_kd_run(out / "run", Corpus(prefix, tokenizer), out / "teacher", steps=steps, eval_interval=steps,
                        **sections)
    return replace(cfg, model=replace(STUDENT, precision="bf16"),
                   teacher=replace(cfg.teacher, model=replace(TEACHER, precision="bf16")))


def _save_random_teacher(cfg) -> int:
    """A random teacher for ``cfg`` saved at ``cfg.teacher.checkpoint`` (collective); the run's vocabulary."""
    import torch

    from megadistill.config import run_vocab_size
    from megadistill.data.tokenizer import tokenizer_vocab_size
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import save_model_checkpoint

    vocab = run_vocab_size(cfg, tokenizer_vocab_size(cfg.data.tokenizer_model))
    torch.manual_seed(7)
    save_model_checkpoint(build_gpt(cfg.teacher.model, cfg, vocab), cfg.teacher.checkpoint)
    return vocab


def _steps(out: Path) -> dict:
    from megadistill.metrics import read_metrics

    keys = ("total loss", "lm loss", "kd loss", "memory_mib")
    return {step: {k: m[k] for k in keys if k in m} for step, m in read_metrics(out).items()}


def case_bf16_step(out: Path, prefix: str, tokenizer: str) -> dict:
    import torch.distributed as dist

    from megadistill.megatron.distributed import init_distributed
    from megadistill.megatron.gpt import build_gpt, use_transformer_engine
    from megadistill.train import run

    cfg = _tiny_kd_run(out, prefix, tokenizer, steps=6)
    init_distributed(cfg)  # one process: nccl on the GPU
    vocab = _save_random_teacher(cfg)
    probe = build_gpt(cfg.model, cfg, vocab)
    teacher = build_gpt(cfg.teacher.model, cfg, vocab)
    param = next(probe.parameters())
    found = {"backend": dist.get_backend(), "param_device": param.device.type, "student_dtype": str(param.dtype),
             "teacher_dtype": str(next(teacher.parameters()).dtype), "vocab": vocab,
             "layer_spec": "transformer_engine" if use_transformer_engine(cfg.model) else "local"}
    del probe, teacher
    result = run(cfg, progress=False)
    found.update(steps=_steps(Path(cfg.output_dir)), val_loss=result.val_losses.get(6, float("nan")),
                 checkpoint=result.checkpoint)
    return found


def _init_one_rank():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megadistill.megatron import cpu
    from megadistill.testing import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    cpu.apply_if_needed(backend)
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)


def case_te_spec(out: Path) -> dict:
    from dataclasses import replace

    import torch

    from megadistill.config import DataConfig, ModelConfig, RunConfig, TeacherConfig
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import load_teacher_checkpoint, save_model_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _init_one_rank()
    vocab, seq = 512, 64
    local = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, precision="fp32", transformer_impl="local")

    def config(model):
        return RunConfig(teacher=TeacherConfig(mode="online", model=model), data=DataConfig(seq_length=seq))

    cfg = config(local)
    a = build_gpt(cfg.teacher.model, cfg, vocab)
    save_model_checkpoint(a, out / "local")
    te_cfg = config(replace(local, transformer_impl="transformer_engine"))
    b = load_teacher_checkpoint(build_gpt(te_cfg.teacher.model, te_cfg, vocab), out / "local")
    dev = _device()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (2, seq), generator=g).to(dev)
    pos = torch.arange(seq, device=dev).expand(2, seq)
    with torch.no_grad():
        la = torch.log_softmax(a(tokens, pos, None).float(), -1)
        lb = torch.log_softmax(b(tokens, pos, None).float(), -1)
    return {"te_module": type(b.decoder.layers[0].self_attention.linear_qkv).__name__,
            "max_logprob_diff": float((la - lb).abs().max())}


def case_nccl(out: Path, prefix: str, tokenizer: str) -> dict:
    from dataclasses import replace

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from kd_reference import reference_dense, vocab_shard
    from megadistill.config import ParallelConfig
    from megadistill.losses import KDLossConfig, vocab_parallel_distillation_loss, vocab_parallel_kd_loss
    from megadistill.megatron.distributed import init_distributed
    from megadistill.train import run

    cfg = _tiny_kd_run(out, prefix, tokenizer, steps=4)
    cfg = replace(cfg, parallel=ParallelConfig(tensor_model_parallel_size=2))
    init_distributed(cfg)  # torchrun's two ranks: nccl, one GPU each
    dev = _device()
    # The vocab-parallel losses over NCCL, fp32, against the full-vocabulary float64 reference.
    s, b, v, alpha = 4, 3, 256, 0.3
    g = torch.Generator().manual_seed(11)  # the same full tensors on both ranks; each takes its shard
    student = torch.randn(s, b, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(s, b, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (s, b), generator=g)
    cfg_kd = KDLossConfig(loss="forward_kl", top_p=0.9, top_k=8, truncation="ghost", temperature=2.0)
    full = student.reshape(-1, v).clone().requires_grad_(True)
    kd_ref = reference_dense(full, teacher.reshape(-1, v), cfg_kd)
    ce_ref = F.cross_entropy(full, labels.reshape(-1), reduction="none")
    errors = {}
    for what, ref in (("kd", kd_ref), ("ce", ce_ref), ("fused", (1 - alpha) * ce_ref + alpha * kd_ref)):
        (ref_grad,) = torch.autograd.grad(ref.sum(), full, retain_graph=True)
        leaf = vocab_shard(student).float().to(dev).requires_grad_(True)
        t = vocab_shard(teacher).float().to(dev)
        if what == "kd":
            loss = vocab_parallel_kd_loss(leaf, t, cfg_kd)
        elif what == "ce":
            loss = vocab_parallel_cross_entropy(leaf * 1.0, labels.to(dev))  # it works in place on its input
        else:
            loss = vocab_parallel_distillation_loss(leaf, labels.to(dev), t, cfg_kd, alpha).total
        loss.sum().backward()
        errors[f"{what} loss"] = _max_rel(loss.detach().reshape(-1), ref.detach())
        errors[f"{what} grad"] = _max_rel(leaf.grad, vocab_shard(ref_grad.reshape(s, b, v)))
    _save_random_teacher(cfg)
    run(cfg, progress=False)
    return {"backend": dist.get_backend(), "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "device": str(dev), "errors": errors, "steps": _steps(Path(cfg.output_dir))}


CASES = {"kd_loss": case_kd_loss, "bf16_step": case_bf16_step, "te_spec": case_te_spec, "nccl": case_nccl}


def main(argv: list[str]) -> None:
    case, out, *args = argv
    for path in (ROOT, HERE.parents[1]):  # this checkout's megadistill; tests/ for tiny_runs, kd_reference
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = CASES[case](out, *args)
    (out / f"result-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(found))
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():  # every rank has written its findings: end cleanly, as megadistill train does
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
