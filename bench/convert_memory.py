"""Peak memory of ``megadistill convert-hf`` against the size of the checkpoint it converts.

Builds once (cached under ``--workdir``) random Llama-shaped Hugging Face models saved as
safetensors: a tiny one, whose conversion measures the part that does not grow with the model (the
constant), and a large one (~450 MB in fp32, ~225 MB in bf16). Each conversion runs in a fresh
process that imports what the conversion needs, then records its resident size (the baseline),
resets the kernel's peak (``/proc/self/clear_refs``) and converts. The processes megatron-core
0.16's checkpoint writer forks read the parent's tensors copy-on-write, and add only their private
pages: a thread samples, every 5 ms, the process's resident size plus its descendants' private
memory. The figure is the larger of that sampled peak and the kernel's own peak resident size
(``VmHWM``, exact but for this process alone), less the baseline.

``--src DIR`` (repeatable) converts with the megadistill tree ``DIR`` as well (e.g. a ``git worktree`` of an
earlier commit), in the same run, so both are measured side by side::

    git worktree add --detach /tmp/md-old 0f3e6f0
    .venv/bin/python bench/convert_memory.py --workdir /tmp/convert-memory --src /tmp/md-old
    git worktree remove /tmp/md-old

Reported per dtype and tree: the safetensors size S, the peak growth G of the large model, the
constant C (the tiny model's growth) and the ratio (G - C) / S; the target is G <= 1.5 S + C.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# Llama-shaped (grouped-query attention, SwiGLU, untied head, Llama 2's vocabulary): ~112 M parameters.
LARGE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(LARGE, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)


def make_models(workdir: Path, dtypes: list[str]) -> dict:
    """``{(size, dtype): directory}`` of the saved models, built once and kept under ``workdir``."""
    import torch
    import transformers

    dirs = {}
    for size, shape in (("tiny", TINY), ("large", LARGE)):
        model = None
        for dtype in dtypes:
            d = workdir / "models" / f"{size}-{dtype}"
            dirs[size, dtype] = d
            if (d / "config.json").is_file():
                continue
            if model is None:
                torch.manual_seed(0)
                model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
            model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(d)
        del model
    return dirs


def safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _private_kb(pid: int) -> int:
    """Memory only ``pid`` holds (its private pages; pages it shares copy-on-write are not counted)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean:", "Private_Dirty:")))


def measure(source: str, output: str) -> dict:
    """In this (fresh) process: convert ``source`` into ``output``; the peak memory it took."""
    import gc

    import megatron.core.dist_checkpointing  # noqa: F401  (imported before the baseline, as the conversion needs it)
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401

    import megadistill
    import megadistill.data.tokenizer  # noqa: F401
    import megadistill.megatron.checkpoint  # noqa: F401
    import megadistill.megatron.gpt  # noqa: F401
    from megadistill.hf.convert import convert

    gc.collect()
    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    children, together, done = [0], [0], threading.Event()

    def sample():  # with the writer's forked processes' private memory
        while not done.wait(0.005):
            private = sum(_private_kb(p) for p in _descendants(os.getpid()))
            children[0] = max(children[0], private)
            together[0] = max(together[0], _status_kb("VmRSS") + private)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    convert(source, output)
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    return {"megadistill": str(Path(megadistill.__file__).parent), "baseline_kb": baseline,
            "peak_kb": max(_status_kb("VmHWM"), together[0]), "process_peak_kb": _status_kb("VmHWM"),
            "children_private_kb": children[0], "seconds": seconds}


def run_one(src: Path, model: Path, output: Path) -> dict:
    """:func:`measure` in a fresh process that imports megadistill from ``src``."""
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    code = (f"import sys, json; sys.path.insert(0, {str(src)!r}); sys.path.insert(1, {str(Path(__file__).parent)!r}); "
            f"import convert_memory as m; print('RESULT', json.dumps(m.measure({str(model)!r}, {str(output)!r})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=output.parent, env=env, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"conversion of {model} with {src} failed:\n{r.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if Path(result["megadistill"]).resolve() != (src / "megadistill").resolve():
        raise RuntimeError(f"the conversion imported megadistill from {result['megadistill']}, not {src}")
    shutil.rmtree(output, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the models are built (once) and converted")
    parser.add_argument("--src", type=Path, action="append", default=[],
                        help="another megadistill tree to measure beside this one (repeatable)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(args.workdir, dtypes)
    trees = [("this tree", Path(__file__).resolve().parent.parent)]
    trees += [(f"--src {src}", src.resolve()) for src in args.src]
    rows = []
    for dtype in dtypes:
        size = safetensors_bytes(models["large", dtype])
        for name, src in trees:
            got = {s: run_one(src, models[s, dtype], args.workdir / "out") for s in ("tiny", "large")}
            growth = {s: (g["peak_kb"] - g["baseline_kb"]) * 1024 for s, g in got.items()}
            constant = growth["tiny"]
            rows.append({
                "dtype": dtype, "tree": name, "safetensors_mb": size / 2**20, "growth_mb": growth["large"] / 2**20,
                "constant_mb": constant / 2**20, "ratio": (growth["large"] - constant) / size,
                "growth_over_size": growth["large"] / size, "baseline_mb": got["large"]["baseline_kb"] / 1024,
                "children_private_mb": got["large"]["children_private_kb"] / 1024, "seconds": got["large"]["seconds"],
                "meets_target": growth["large"] <= 1.5 * size + constant,
            })
    print(f"convert-hf peak memory, Llama-shaped random model ({LARGE['num_hidden_layers']} layers, hidden "
          f"{LARGE['hidden_size']}, vocab {LARGE['vocab_size']}, untied); constant = the growth converting a "
          f"{safetensors_bytes(models['tiny', dtypes[0]]) / 2**10:.0f} KiB model\n")
    print("| dtype | tree | safetensors S (MiB) | peak growth G (MiB) | constant C (MiB) | (G - C) / S | G / S | "
          "G <= 1.5 S + C | writer children, private (MiB) | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['tree']} | {r['safetensors_mb']:.0f} | {r['growth_mb']:.0f} | {r['constant_mb']:.0f} | "
              f"{r['ratio']:.2f} | {r['growth_over_size']:.2f} | {'yes' if r['meets_target'] else 'no'} | "
              f"{r['children_private_mb']:.0f} | {r['seconds']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
