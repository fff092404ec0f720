"""``megadistill demo --fast`` end to end: every step runs, the report holds every section, and its
arithmetic (costs, equal wall-clock, steps to reach the baseline) follows from the run records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
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
    # The top-p-k store is read by PD offline and, at every truncation seed, the renormalised and ghost runs.
    k = FAST.truncation_seeds
    share = recs["precompute_top_p_k"]["seconds"] / (1 + 2 * k)
    for name in ("pd_offline", "trunc_renormalize", "trunc_ghost", "trunc_ghost@1"):
        assert cost[name].inference == pytest.approx(share)
        if name in rows:
            assert float(rows[name][2]) == pytest.approx(share, abs=0.051)
    assert cost["pd_online"].inference == 0 and cost["baseline"].teacher_training == 0
    assert cost["trunc_untruncated"].inference == 0 and float(rows["trunc_untruncated"][2]) == 0
    # Three main PD runs, and the three truncated rows and the untruncated ceiling at every seed.
    teacher_users = [n for n, r in recs.items() if r["role"] == "student" and "large_teacher" in r["uses"]]
    assert len(teacher_users) == 3 + 4 * k
    assert cost["pd_online"].teacher_training == pytest.approx(recs["large_teacher"]["seconds"] / (3 + 4 * k))


def test_the_truncation_table_follows_from_the_records(demo):
    _, text, data = demo
    recs = data["records"]
    body = text.split("## Truncation side by side", 1)[1].split("\n## ", 1)[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
             if line.startswith("| ") and not line.startswith("| targets")]
    final = {n: float(r["val_losses"][str(r["steps"])]) for n, r in recs.items() if r["kind"] == "train"}

    def seeds_of(name):
        return [final[n] for n in recs if n.split("@")[0] == name]

    order = ["trunc_baseline", "trunc_untruncated", "trunc_renormalize", "trunc_ghost", "trunc_rskd"]
    assert len(cells) == len(order)
    lm, top = np.mean(seeds_of("trunc_baseline")), np.mean(seeds_of("trunc_untruncated"))
    for name, (label, loss, k, d_lm, _, d_top, _) in zip(order, cells):
        vals = seeds_of(name)
        assert len(vals) == FAST.truncation_seeds == int(k), name
        mean, sd = loss.split(" ± ")
        assert float(mean) == pytest.approx(np.mean(vals), abs=5e-5), name
        assert float(sd) == pytest.approx(np.std(vals, ddof=1), abs=5e-5), name
        if name != "trunc_baseline":
            assert float(d_lm) == pytest.approx(np.mean(vals) - lm, abs=2e-4), name
        if name not in ("trunc_baseline", "trunc_untruncated"):
            assert float(d_top) == pytest.approx(np.mean(vals) - top, abs=2e-4), name
    assert [c[0] for c in cells[:2]] == ["LM only", "untruncated teacher (online)"]


def _synthetic(runs: dict[str, list[float]], group: str = "truncation") -> dict[str, dict]:
    """Records of ``{name: [final loss per seed]}`` (a two-point validation curve each)."""
    recs = {}
    for name, losses in runs.items():
        for seed, loss in enumerate(losses):
            n = name if seed == 0 else f"{name}@{seed}"
            recs[n] = {"name": n, "label": f"τ=2, α=0.9: {name} targets", "group": "main" if name == "baseline" else group,
                       "steps": 100, "seed": seed, "val_losses": {"50": loss + 1.0, "100": loss}}
    return recs


def test_the_truncation_verdict_counts_a_difference_only_beyond_the_seed_spread():
    lm = [5.30, 5.32, 5.31]  # sd 0.01
    top = [5.70, 5.74, 5.72]  # sd 0.02
    runs = {
        "trunc_baseline": lm, "trunc_untruncated": top,
        "trunc_ghost": [5.69, 5.75, 5.73],  # 0.003 above the ceiling, sd 0.031: the same as the ceiling
        "trunc_renormalize": [6.20, 6.30, 6.25],  # far beyond both
        "trunc_rskd": [5.29, 5.33, 5.345],  # 0.012 above LM only: beyond LM only's sd (0.01), within its own (0.028)
    }
    rows = {r["name"]: r for r in report.truncation_rows(_synthetic(runs))}
    assert list(rows) == ["trunc_baseline", "trunc_untruncated", "trunc_renormalize", "trunc_ghost", "trunc_rskd"]
    for name, vals in runs.items():
        r = rows[name]
        assert r["mean"] == pytest.approx(np.mean(vals)) and r["sd"] == pytest.approx(np.std(vals, ddof=1))
        assert r["seeds"] == 3
    assert rows["trunc_ghost"]["d_ceiling"] == pytest.approx(np.mean(runs["trunc_ghost"]) - np.mean(top))
    assert rows["trunc_ghost"]["verdict_ceiling"].startswith("no difference")
    assert rows["trunc_ghost"]["verdict_lm"].startswith("**worse**")
    assert rows["trunc_renormalize"]["verdict_ceiling"].startswith("**worse**")
    # The spread is the larger of the two rows' standard deviations, not the reference's alone.
    assert abs(rows["trunc_rskd"]["d_lm"]) > np.std(lm, ddof=1)
    assert rows["trunc_rskd"]["verdict_lm"].startswith("no difference")
    assert rows["trunc_rskd"]["verdict_ceiling"].startswith("**better**")
    assert rows["trunc_untruncated"]["verdict_lm"].startswith("**worse**") and rows["trunc_untruncated"]["d_ceiling"] is None
    # The report's table and sentences say the same, with the spread they were judged by.
    text = "\n".join(report.truncation_section(_synthetic(runs)))
    row = next(line for line in text.splitlines() if line.startswith("| trunc_ghost targets |"))
    spread = max(np.std(runs["trunc_ghost"], ddof=1), np.std(top, ddof=1))
    assert row.split("|")[7].strip() == f"no difference: within the seed spread ({spread:.4f})"
    said = next(line for line in text.splitlines() if line.startswith("- trunc_ghost targets:"))
    assert f"no difference, within the seed spread of {spread:.4f}" in said
    assert "better" not in said and "worse" not in said
    # Without a side by side baseline of its own, the main baseline's seeds are the reference.
    main = _synthetic({"baseline": lm, "trunc_untruncated": top})
    assert [r["name"] for r in report.truncation_rows(main)] == ["baseline", "trunc_untruncated"]
    # One seed each: no spread to judge by, and the verdict says so.
    assert "spread unknown" in report.truncation_rows(_synthetic({"trunc_baseline": [5.3], "trunc_ghost": [5.4]}))[1]["verdict_lm"]


def test_the_plan_runs_every_truncation_row_over_seeds_with_the_untruncated_ceiling(tmp_path):
    from megadistill.demo.runs import DATA_SEED

    for scale, seeds in ((FAST, 1), (DEFAULT, 1), (FAST, 4)):
        steps = {st.name: st for st in plan(tmp_path, scale, seeds)}
        n = max(seeds, scale.truncation_seeds)
        for base in ("trunc_renormalize", "trunc_ghost", "trunc_rskd", "trunc_untruncated", "trunc_baseline"):
            names = sorted(k for k, st in steps.items() if k.split("@")[0] == base)
            assert len(names) == n, (scale.name, base)
            for k in names:
                st = steps[k]
                assert st.group == "truncation" and st.cfg.training.train_steps == scale.truncation_steps
                assert st.cfg.training.seed == DATA_SEED + st.seed and st.cfg.data.seed == DATA_SEED
            assert sorted(steps[k].seed for k in names) == list(range(n))
        top = steps["trunc_untruncated"]
        teacher = steps["large_teacher"]
        kd = top.cfg.kd
        assert (top.cfg.teacher.mode, top.cfg.teacher.model) == ("online", scale.teacher)
        assert top.cfg.teacher.checkpoint == str(Path(teacher.cfg.output_dir) / "checkpoints")
        assert (kd.top_p, kd.top_k, kd.temperature) == (1.0, None, 2.0)
        # The same τ and α as the truncated rows: only the truncation differs.
        ghost = steps["trunc_ghost"].cfg.kd
        assert (ghost.temperature, ghost.alpha, ghost.loss) == (kd.temperature, kd.alpha, kd.loss)
        assert (ghost.top_p, ghost.top_k, ghost.truncation) == (0.95, 50, "ghost")
        assert steps["precompute_top_p_k"].options == {"kind": "top_p_k", "temperatures": (1.0, 2.0)}
        rskd = steps["precompute_rskd"]
        assert rskd.options == {"kind": "rskd", "draws": scale.rskd_draws, "temperatures": (2.0,)}
        assert rskd.cfg.kd.temperature == 2.0


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


def test_a_step_is_made_again_when_a_step_it_reads_was(tmp_path):
    # The runs reading a store are made again when the store is, even with their own config
    # unchanged (before: a changed precompute left the PD runs' records, trained on the old store).
    from dataclasses import replace

    from megadistill.demo.runner import _write_json, config_sha256, load_record, record_path

    steps = {s.name: s for s in plan(tmp_path, FAST)}
    pre, pd = steps["precompute_top_p_k"], steps["pd_offline"]
    assert "precompute_top_p_k" in pd.uses
    ups = {u: config_sha256(steps[u]) for u in pd.uses}
    upstream = tuple(ups[u] for u in pd.uses)
    _write_json(record_path(tmp_path, pd.name), {"config_sha256": config_sha256(pd, upstream)})
    assert load_record(tmp_path, pd, upstream) is not None
    ups["precompute_top_p_k"] = config_sha256(replace(pre, options={**pre.options, "temperatures": (1.0, 4.0)}))
    assert load_record(tmp_path, pd, tuple(ups[u] for u in pd.uses)) is None
