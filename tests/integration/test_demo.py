"""``megadistill demo --fast`` end to end: every step runs, the report holds every section, and its
arithmetic (costs, equal wall-clock, steps to reach the baseline) follows from the run records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megadistill.demo import report
from megadistill.demo.runs import DEFAULT, FAST, plan, scaled


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megadistill.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    text = run_demo(out, fast=True, progress=False)
    return out, text, json.loads((out / "records.json").read_text())


SECTIONS = (
    "## Runs", "## Validation loss at equal steps", "## Steps to reach the baseline's final validation loss",
    "## Wall-clock, including the teacher's cost", "## Equal wall-clock: a baseline given each run's time",
    "## Truncation side by side: τ = 2, α = 0.9 constant", "## Logits stores", "## Plots", "## What was shortened",
)


def test_the_fast_demo_runs_every_step_and_reports_every_section(demo):
    out, text, data = demo
    assert (out / "report.md").read_text() == text
    for s in SECTIONS:
        assert s in text, s
    names = {st.name for st in plan(out, FAST)}
    assert set(data["records"]) == names
    for png in ("val_curves.png", "wall_clock.png", "truncation.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in text
    for name, rec in data["records"].items():
        if rec["kind"] == "train":  # TensorBoard logs of every run, and the steps it was asked for
            assert list((out / name).rglob("events.out.tfevents.*")), name
            assert rec["steps"] == rec["train_steps"] and rec["val_losses"], name


def _table(text: str, heading: str) -> list[list[str]]:
    body = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return [[c.strip().strip("`") for c in r.strip("|").split("|")] for r in rows]


def test_the_equal_wall_clock_arithmetic_follows_from_the_records(demo):
    _, text, data = demo
    recs = data["records"]
    # Independently of report.py: seconds of each step, shares split among the student runs using it.
    users = {}
    for r in recs.values():
        if r["role"] == "student":
            for u in r["uses"]:
                users[u] = users.get(u, 0) + 1
    final = {n: float(r["val_losses"][str(r["steps"])]) for n, r in recs.items() if r["kind"] == "train"}
    seeds = [n for n in recs if n.split("@")[0] == "baseline"]
    assert len(seeds) == FAST.baseline_seeds
    # The baseline's own point: the mean over its seeds (time and loss); the longer ones: seed 0.
    base = sorted([(sum(recs[n]["seconds"] for n in seeds) / len(seeds), sum(final[n] for n in seeds) / len(seeds))]
                  + [(recs[n]["seconds"], final[n]) for n in recs if n.startswith("baseline_x")])
    assert len(base) == len(FAST.baseline_lengths)
    rows = _table(text, "## Equal wall-clock")
    assert [r[0] for r in rows] == ["pd_offline", "pd_online", "pd_recorded", "salt", "salt_ds"]
    for name, seconds, loss, at, diff, *_ in rows:
        r = recs[name]
        total = r["seconds"] + sum(recs[u]["seconds"] / users[u] for u in r["uses"] if recs[u]["role"] == "inference")
        assert float(seconds) == pytest.approx(total, abs=0.051)
        assert float(loss) == pytest.approx(float(r["val_losses"][str(r["steps"])]), abs=5e-5)
        if base[0][0] <= total <= base[-1][0]:
            (x0, y0), (x1, y1) = next(((p, q) for p, q in zip(base, base[1:]) if p[0] <= total <= q[0]))
            want = y0 + (y1 - y0) * (total - x0) / (x1 - x0) if x1 > x0 else y0
            assert float(at) == pytest.approx(want, abs=5e-5), name
            assert float(diff) == pytest.approx(float(loss) - float(at), abs=2e-4)
        else:
            assert at == "–" and f"`{name}`: its time lies outside the baselines' range" in text


def test_the_cost_table_splits_teacher_work_among_its_users(demo):
    _, text, data = demo
    recs = data["records"]
    cost = report.costs(recs)
    rows = {r[0]: r for r in _table(text, "## Wall-clock, including the teacher's cost")}
    # The top-p-k store is read by PD offline and two truncation runs: each carries a third.
    share = recs["precompute_top_p_k"]["seconds"] / 3
    for name in ("pd_offline", "trunc_renormalize", "trunc_ghost"):
        assert cost[name].inference == pytest.approx(share)
        assert float(rows[name][2]) == pytest.approx(share, abs=0.051)
    assert cost["pd_online"].inference == 0 and cost["baseline"].teacher_training == 0
    teacher_users = [n for n, r in recs.items() if r["role"] == "student" and "large_teacher" in r["uses"]]
    assert len(teacher_users) == 6
    assert cost["pd_online"].teacher_training == pytest.approx(recs["large_teacher"]["seconds"] / 6)


def test_store_sizes_are_the_files_on_disk(demo):
    out, text, data = demo
    for r in data["records"].values():
        if "store" in r:
            files = sum(p.stat().st_size for p in Path(r["store"]).glob("shard-*.bin"))
            assert files == r["store_bytes"]
            assert re.search(rf"\| `{Path(r['store']).name}` \| {r['bytes_per_token']:.1f} \|", text)


def test_a_second_demo_reuses_the_finished_steps(demo, capsys):
    from megadistill.demo import run_demo

    out, text, data = demo
    again = run_demo(out, fast=True, progress=False)
    strip = lambda t: re.sub(r"this invocation [\d.]+ min", "", t)  # noqa: E731
    assert strip(again) == strip(text)


def test_steps_to_reach_and_interpolate():
    pts = [(10, 5.0), (20, 4.0), (30, 3.5)]
    assert report.steps_to_reach(pts, 4.0) == 20
    assert report.steps_to_reach(pts, 4.5) == pytest.approx(15)
    assert report.steps_to_reach(pts, 3.0) is None
    assert report.steps_to_reach(pts, 6.0) == 10
    assert report.interpolate([(1.0, 2.0), (3.0, 4.0)], 2.0) == pytest.approx(3.0)
    assert report.interpolate([(1.0, 2.0), (3.0, 4.0)], 3.5) is None


def test_scale_grows_steps_and_widths():
    s = scaled(DEFAULT, 4.0)
    assert s.student_steps == 4 * DEFAULT.student_steps and s.student.hidden_size == 2 * DEFAULT.student.hidden_size
    assert s.student.hidden_size % s.student.num_attention_heads == 0
    with pytest.raises(ValueError, match="--scale"):
        scaled(DEFAULT, 0)


def test_outputs_of_another_config_are_moved_aside_and_never_overwritten(tmp_path):
    from dataclasses import replace

    from megadistill.demo.runner import _claim_outputs

    step = next(s for s in plan(tmp_path, FAST) if s.name == "precompute_top_p_k")
    run_dir, store = Path(step.cfg.output_dir), Path(step.cfg.teacher.store)
    for d in (run_dir, store):  # an earlier demo's files
        d.mkdir(parents=True)
        (d / "old.txt").write_text("earlier demo")
    _claim_outputs(tmp_path, step)
    assert not run_dir.exists() and not store.exists()
    moved = sorted(p.name for p in tmp_path.rglob("old.txt"))
    assert len(moved) == 2 and all((p.parent.name.split(".superseded-")[0] in (run_dir.name, store.name))
                                   for p in tmp_path.rglob("old.txt"))
    # Begun for this config (a demo killed mid-step): kept, to resume.
    run_dir.mkdir()
    (run_dir / "partial.txt").write_text("this config")
    _claim_outputs(tmp_path, step)
    assert (run_dir / "partial.txt").exists()
    # The config changed: moved aside again.
    changed = replace(step, options={"kind": "top_p_k", "draws": 3})
    _claim_outputs(tmp_path, changed)
    assert not run_dir.exists() and len(list(tmp_path.rglob("partial.txt"))) == 1
