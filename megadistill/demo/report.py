"""The demo's report: pure arithmetic over the step records (``runner``), a Markdown page and PNG plots.

Costs. A student's *training* seconds are its own run's wall-clock (an online teacher's forwards
included). *Teacher inference* is a precompute or a scoring pass, shared equally by the student
runs that read its output. *Teacher training* (the large teacher, with its recording; the small
LM) is counted separately and amortised equally over the student runs distilled from it.

Equal wall-clock. The baselines trained for 1x, 1.5x, 2x the steps (each a full LR schedule)
give points (seconds, final validation loss); a run's equal-time baseline is the piecewise-linear
interpolation at the run's seconds (training + teacher inference), and is not extrapolated
outside the baselines' range.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MAIN = ("baseline", "pd_offline", "pd_online", "pd_recorded", "salt", "salt_ds")
# One colour per run in every plot; PD offline dashed, since it lies on PD online (the same targets).
STYLE = {"baseline": ("k", "-"), "pd_offline": ("tab:blue", "--"), "pd_online": ("tab:orange", "-"),
         "pd_recorded": ("tab:red", "-"), "salt": ("tab:green", "-"), "salt_ds": ("tab:purple", "-")}
TRUNCATION = ("trunc_renormalize", "trunc_ghost", "trunc_rskd", "trunc_untruncated")
CEILING = "trunc_untruncated"
"""The truncation side by side's reference ceiling: the same student and knobs with the full teacher."""


def base_name(name: str) -> str:
    """``pd_online@2`` -> ``pd_online`` (the run of another seed)."""
    return name.split("@", 1)[0]


def curve(rec: dict) -> list[tuple[int, float]]:
    """The run's validation curve ``[(step, loss)]``, by step."""
    return sorted((int(k), float(v)) for k, v in rec["val_losses"].items())


def final_loss(rec: dict) -> float:
    return curve(rec)[-1][1]


def mean_curve(records: dict[str, dict], name: str, group: str) -> list[tuple[int, float]]:
    """The mean validation curve over ``name``'s seeds in ``group``, at the steps every seed validated."""
    curves = [dict(curve(r)) for n, r in records.items() if base_name(n) == name and r["group"] == group]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(step, statistics.fmean(c[step] for c in curves)) for step in common]


def steps_to_reach(points: list[tuple[int, float]], target: float) -> Optional[float]:
    """The first step at which the curve reaches ``target`` (linear between validations; the
    curve starts at step 0 from above), or None if it never does."""
    prev = None
    for step, loss in points:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def interpolate(points: list[tuple[float, float]], x: float) -> Optional[float]:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x); None outside their range."""
    points = sorted(points)
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]  # a single point, x on it


@dataclass(frozen=True)
class Cost:
    """A student run's wall-clock, in seconds."""

    training: float
    """Its own run (an online teacher's forwards included)."""
    inference: float
    """Its share of the precompute/scoring passes it reads."""
    teacher_training: float
    """Its share of the training of the teachers it learns from."""

    @property
    def total(self) -> float:
        """Training and teacher inference (what the equal-wall-clock comparison gives the baseline)."""
        return self.training + self.inference


def costs(records: dict[str, dict]) -> dict[str, Cost]:
    """Every student run's ``Cost``: each teacher/inference step's seconds divided equally among
    the student runs that use it."""
    users: dict[str, int] = {}
    for rec in records.values():
        if rec["role"] == "student":
            for u in rec["uses"]:
                users[u] = users.get(u, 0) + 1
    out = {}
    for name, rec in records.items():
        if rec["role"] != "student":
            continue
        inf = sum(records[u]["seconds"] / users[u] for u in rec["uses"] if records[u]["role"] == "inference")
        tea = sum(records[u]["seconds"] / users[u] for u in rec["uses"] if records[u]["role"] == "teacher")
        out[name] = Cost(training=rec["seconds"], inference=inf, teacher_training=tea)
    return out


def baseline_seconds(records: dict[str, dict]) -> float:
    """The baseline's wall-clock: the mean over its seeds (one CPU run's time varies by ~±15 %)."""
    return statistics.fmean(r["seconds"] for n, r in records.items() if base_name(n) == "baseline")


def baseline_runs(records: dict[str, dict]) -> list[tuple[int, float, float]]:
    """``(steps, seconds, final validation loss)`` of the baselines of every length, by steps: the
    mean over seeds for the baseline itself, the seed-0 run for the longer ones."""
    runs = [(records["baseline"]["steps"], baseline_seconds(records), seed_stats(records, "baseline")[0])]
    runs += [(r["steps"], r["seconds"], final_loss(r)) for n, r in records.items() if n.startswith("baseline_x")]
    return sorted(runs)


def baseline_points(records: dict[str, dict]) -> list[tuple[float, float]]:
    """``(seconds, final validation loss)`` of the baselines, by seconds."""
    return sorted((t, loss) for _, t, loss in baseline_runs(records))


def equal_wall_clock(records: dict[str, dict]) -> list[dict]:
    """One row per seed-0 main run: its seconds, final loss, and the baseline's loss interpolated
    at the same seconds (None outside the baselines' range), with and without the teacher's
    training share."""
    pts, cost = baseline_points(records), costs(records)
    rows = []
    for name in MAIN[1:]:
        if name not in records:
            continue
        c = cost[name]
        rows.append({
            "name": name, "label": records[name]["label"], "seconds": c.total, "loss": final_loss(records[name]),
            "baseline": interpolate(pts, c.total),
            "seconds_with_teacher": c.total + c.teacher_training,
            "baseline_with_teacher": interpolate(pts, c.total + c.teacher_training),
        })
    return rows


def seed_stats(records: dict[str, dict], name: str, group: str = "main") -> tuple[float, Optional[float], int]:
    """``(mean, sample standard deviation or None, n)`` of the final loss over ``name``'s seeds in ``group``."""
    vals = [final_loss(r) for n, r in records.items() if base_name(n) == name and r["group"] == group]
    if not vals:
        raise KeyError(f"no {group} run named {name!r} in the demo's records")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def verdict(d: float, sd_a: Optional[float], sd_b: Optional[float]) -> str:
    """How a difference of means ``d`` (run − reference, lower loss is better) reads against the seed
    spread: the larger of the two sample standard deviations. Only a difference beyond it is called
    better or worse."""
    spread = max((x for x in (sd_a, sd_b) if x is not None), default=None)
    word = "better" if d < 0 else "worse"
    if spread is None:
        return f"{word} (one seed each: spread unknown)"
    if abs(d) > spread:
        return f"**{word}**, beyond the seed spread ({spread:.4f})"
    return f"no difference: within the seed spread ({spread:.4f})"


def truncation_reference(records: dict[str, dict]) -> Optional[tuple[str, str]]:
    """``(name, group)`` of the LM-only run the truncation rows are compared with: the side by side's
    own baseline at its length, else the main baseline (the same length), or None."""
    if "trunc_baseline" in records:
        return "trunc_baseline", "truncation"
    return ("baseline", "main") if "baseline" in records else None


def truncation_rows(records: dict[str, dict]) -> list[dict]:
    """The truncation side by side over seeds: the LM-only reference first, then every row of
    ``TRUNCATION`` present, each with its mean final loss, sample standard deviation, seeds, and its
    difference (and verdict) to the LM-only reference and to the untruncated ceiling."""
    ref = truncation_reference(records)
    names = [n for n in TRUNCATION if n in records]
    if ref is None or not names:
        return []
    lm = seed_stats(records, *ref)
    ceiling = seed_stats(records, CEILING, "truncation") if CEILING in records else None
    rows = []
    for name, group in (ref, (CEILING, "truncation"), *((n, "truncation") for n in TRUNCATION if n != CEILING)):
        if name not in records:
            continue
        mean, sd, k = seed_stats(records, name, group)
        row = {"name": name, "label": "LM only" if name == ref[0] else records[name]["label"].split(": ", 1)[-1],
               "mean": mean, "sd": sd, "seeds": k, "d_lm": None, "verdict_lm": "–", "d_ceiling": None,
               "verdict_ceiling": "–"}
        if name != ref[0]:
            row.update(d_lm=mean - lm[0], verdict_lm=verdict(mean - lm[0], sd, lm[1]))
        if ceiling is not None and name not in (CEILING, ref[0]):
            row.update(d_ceiling=mean - ceiling[0], verdict_ceiling=verdict(mean - ceiling[0], sd, ceiling[1]))
        rows.append(row)
    return rows


def truncation_section(records: dict[str, dict]) -> list[str]:
    """The report's truncation section (Markdown lines; none without truncation runs). Every finding
    in it is computed from the rows."""
    rows = truncation_rows(records)
    if not rows:
        return []
    by = {r["name"]: r for r in rows}
    ref = rows[0]
    first = next(n for n in TRUNCATION if n in records)
    seeds = sorted({r["seeds"] for r in rows[1:]})
    L = ["## Truncation side by side: τ = 2, α = 0.9 constant", ""]
    L.append(
        f"{records[first]['steps']} steps each, {'/'.join(map(str, seeds))} seeds per row (the student's weights "
        f"seed; the data order and the stores stay), LM-only reference `{ref['name']}` over {ref['seeds']} seeds. "
        "Final validation loss, mean ± sample standard deviation over seeds. The untruncated teacher (online, every "
        "id of the teacher, the same τ and α) is the reference ceiling: a truncated row's gap to it is what its "
        "truncation costs. As in the main table, a difference counts only beyond the seed spread: the larger of the "
        "two rows' standard deviations.")
    L.append("")
    L.append("| targets | final val loss | seeds | − LM only | vs LM only | − untruncated | vs untruncated |")
    L.append("|---|---:|---:|---:|---|---:|---|")
    for r in rows:
        L.append(f"| {r['label']} | {r['mean']:.4f}" + (f" ± {r['sd']:.4f}" if r["sd"] is not None else "")
                 + f" | {r['seeds']} | {_fmt(r['d_lm'], '+.4f')} | {r['verdict_lm']} | {_fmt(r['d_ceiling'], '+.4f')} "
                 f"| {r['verdict_ceiling']} |")
    L.append("")
    ceiling = by.get(CEILING)
    if ceiling is not None:
        L.append(f"- The untruncated teacher vs LM only (τ = 2 at α = 0.9 without any truncation): "
                 f"{ceiling['d_lm']:+.4f}, {_in_sentence(ceiling['verdict_lm'])}.")
        for r in rows:
            if r["name"] in (ref["name"], CEILING):
                continue
            L.append(f"- {r['label']}: {r['d_lm']:+.4f} vs LM only, of which {r['d_ceiling']:+.4f} vs the untruncated "
                     f"teacher ({_in_sentence(r['verdict_ceiling'])}) and {ceiling['d_lm']:+.4f} the untruncated teacher's own.")
        L.append("")
    return L


def _in_sentence(v: str) -> str:
    """A ``verdict`` worded for the inside of a sentence: no emphasis, no nested brackets."""
    v = re.sub(r"seed spread \(([0-9.]+)\)", r"seed spread of \1", v.replace("**", ""))
    return v.replace("no difference: ", "no difference, ").replace(" (one seed each: spread unknown)",
                                                                  ", with one seed each (spread unknown)")


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(records: dict[str, dict], meta: dict, plots: dict[str, str]) -> str:
    """The report's Markdown. ``meta``: scale, seeds, corpus, total seconds, shortened notes."""
    L: list[str] = []
    a = L.append
    main = [n for n in MAIN if n in records]
    a("# megadistill demo: both papers at toy scale")
    a("")
    steps_s = sum(r["seconds"] for r in records.values())
    a(f"{meta['corpus']}. Scale `{meta['scale']}`; {meta['seeds']} seed(s) per main student run (the baseline and the "
      "truncation side by side may run more: their sections give the count). Its steps took "
      f"{steps_s / 60:.1f} min in all on {meta['cores']} CPU core(s) (this invocation {meta['seconds'] / 60:.1f} min: "
      "finished steps are reused). Every run shares one tokenizer, one sample order and one held-out validation set; "
      "students share one model shape and LR schedule (WSD). Wall-clock on a shared CPU varies by ±15 % or more "
      "between runs.")
    a("")
    a("## Runs")
    a("")
    for rec in records.values():
        if base_name(rec["name"]) == rec["name"]:
            a(f"- `{rec['name']}`: {rec['label']} — {rec['seconds']:.0f} s")
    a("")
    a("## Validation loss at equal steps")
    a("")
    steps = sorted(set.intersection(*(set(s for s, _ in curve(records[n])) for n in main))) if main else []
    a("| step | " + " | ".join(f"`{n}`" for n in main) + " |")
    a("|---:|" + "---:|" * len(main))
    for s in steps:
        vals = {n: dict(curve(records[n]))[s] for n in main}
        a(f"| {s} | " + " | ".join(_fmt(vals[n]) for n in main) + " |")
    a("")
    if "baseline" in records:
        b_mean, b_sd, b_n = seed_stats(records, "baseline")
        a("Final validation loss, mean ± sample standard deviation over seeds, and the difference to the "
          "baseline's mean. The seed spread a difference is judged by: the larger of the run's and the baseline's "
          "standard deviation (the baseline always runs several seeds).")
        a("")
        a("| run | final val loss | seeds | − baseline | verdict at equal steps |")
        a("|---|---:|---:|---:|---|")
        for n in main:
            mean, sd, k = seed_stats(records, n)
            d = mean - b_mean
            said = "–" if n == "baseline" else verdict(d, sd, b_sd)
            a(f"| `{n}` | {mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" | {k} | {d:+.4f} | {said} |")
        a("")
        a("## Steps to reach the baseline's final validation loss")
        a("")
        target = b_mean
        a(f"Target: {target:.4f} (the baseline after {records['baseline']['steps']} steps, mean over its seeds).")
        a("")
        a("| run | steps needed | of the baseline's |")
        a("|---|---:|---:|")
        for n in main:
            got = steps_to_reach(curve(records[n]), target)
            share = "–" if got is None else f"{got / records['baseline']['steps']:.0%}"
            a(f"| `{n}` | " + ("not reached" if got is None else f"{got:.0f}") + f" | {share} |")
        a("")
    cost = costs(records)
    a("## Wall-clock, including the teacher's cost")
    a("")
    teachers = [r for r in records.values() if r["role"] == "teacher"]
    for t in teachers:
        users = [n for n, r in records.items() if t["name"] in r.get("uses", ()) and r["role"] == "student"]
        a(f"- Teacher training, counted separately: `{t['name']}` took {t['seconds']:.0f} s, amortised over the "
          f"{len(users)} student runs distilled from it ({t['seconds'] / max(len(users), 1):.0f} s each).")
    inference = [r for r in records.values() if r["role"] == "inference"]
    for r in inference:
        users = [n for n, x in records.items() if r["name"] in x.get("uses", ()) and x["role"] == "student"]
        a(f"- Teacher inference: `{r['name']}` ({r['label']}) took {r['seconds']:.0f} s, shared by {len(users)} run(s).")
    a("")
    a("| run | training s | teacher inference s | total s | × baseline | + teacher training share s |")
    a("|---|---:|---:|---:|---:|---:|")
    b_time = baseline_seconds(records) if "baseline" in cost else None
    for n in [*main, *[x for x in TRUNCATION if x in records]]:
        c = cost[n]
        a(f"| `{n}` | {c.training:.1f} | {c.inference:.1f} | {c.total:.1f} | "
          f"{_fmt(c.total / b_time if b_time else None, '.2f')} | {c.teacher_training:.1f} |")
    a("")
    a("## Equal wall-clock: a baseline given each run's time")
    a("")
    pts = baseline_points(records)
    a("Baselines of " + ", ".join(f"{steps} steps ({t:.0f} s → {loss:.4f})" for steps, t, loss in baseline_runs(records))
      + " (the first: the mean over its seeds); interpolated linearly in seconds, not extrapolated.")
    a("")
    a("| run | total s | its final loss | baseline at that time | run − baseline | with teacher training: s | baseline then |")
    a("|---|---:|---:|---:|---:|---:|---:|")
    ewc = equal_wall_clock(records)
    for row in ewc:
        d = None if row["baseline"] is None else row["loss"] - row["baseline"]
        a(f"| `{row['name']}` | {row['seconds']:.1f} | {row['loss']:.4f} | {_fmt(row['baseline'])} | {_fmt(d, '+.4f')} | "
          f"{row['seconds_with_teacher']:.1f} | {_fmt(row['baseline_with_teacher'])} |")
    a("")
    for row in ewc:
        if row["baseline"] is None:
            a(f"- `{row['name']}`: its time lies outside the baselines' range ({pts[0][0]:.0f}–{pts[-1][0]:.0f} s): "
              "not compared.")
        elif row["loss"] < row["baseline"]:
            a(f"- `{row['name']}` beats a baseline given the same time ({row['loss']:.4f} vs {row['baseline']:.4f}).")
        else:
            a(f"- `{row['name']}` does **not** beat a baseline given the same time ({row['loss']:.4f} vs {row['baseline']:.4f}).")
    a("")
    L += truncation_section(records)
    stores = [r for r in records.values() if "bytes_per_token" in r]
    if stores:
        a("## Logits stores")
        a("")
        a("| store | bytes/token | size |")
        a("|---|---:|---:|")
        for r in stores:
            a(f"| `{Path(r['store']).name}` | {r['bytes_per_token']:.1f} | {r['store_bytes'] / 2**20:.1f} MiB |")
        a("")
    if plots:
        a("## Plots")
        a("")
        for title, path in plots.items():
            a(f"![{title}]({path})")
            a("")
    a("## What was shortened")
    a("")
    for note in meta["notes"]:
        a(f"- {note}")
    a("")
    a(f"TensorBoard logs of every run: `tensorboard --logdir {meta['out']}`.")
    a("")
    L += export_section(records, meta["out"])
    return "\n".join(L)


def best_student(records: dict[str, dict]) -> Optional[str]:
    """The run (any seed) with the lowest final validation loss among the main comparison's students,
    those the report ranks at equal steps (the longer baselines trained for more steps); None
    without one."""
    students = [n for n, r in records.items()
                if r["role"] == "student" and r.get("group", "main") == "main" and r.get("val_losses")]
    return min(students, key=lambda n: (final_loss(records[n]), n)) if students else None


def export_section(records: dict[str, dict], out: str) -> list[str]:
    """The closing section: the command that writes the best student out as a Hugging Face model
    (a run's directory is ``<out>/<name>``, see ``megadistill.demo.runs``)."""
    best = best_student(records)
    if best is None:
        return []
    run = Path(out) / best
    return [
        "## The best student as a Hugging Face model",
        "",
        f"`{best}` ended with the lowest validation loss of the students at equal steps "
        f"({final_loss(records[best]):.4f}). Its last checkpoint, as a Hugging Face model directory (config.json, "
        "safetensors, tokenizer):",
        "",
        "```",
        f"megadistill export-hf {run} --output {Path(out) / 'hf' / best}",
        "```",
        "",
    ]


def plot(records: dict[str, dict], out: Path) -> dict[str, str]:
    """PNG plots beside the report: ``{title: file name}`` (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made = {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n in MAIN:
        if n in records:
            xs, ys = zip(*curve(records[n]))
            color, line = STYLE[n]
            ax.plot(xs, ys, marker=".", label=n, color=color, linestyle=line)
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss at equal steps")
    made["validation curves"] = _save(plt, fig, ax, out / "val_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    pts = baseline_points(records)
    if pts:
        lengths = [steps for steps, _, _ in baseline_runs(records)]
        ax.plot(*zip(*pts), marker="o", color="k", label=f"baselines ({', '.join(map(str, lengths))} steps)")
    for row in equal_wall_clock(records):
        ax.scatter([row["seconds"]], [row["loss"]], label=row["name"], color=STYLE[row["name"]][0], zorder=3)
    ax.set(xlabel="wall-clock s (training + teacher inference)", ylabel="final validation loss",
           title="Equal wall-clock")
    made["equal wall-clock"] = _save(plt, fig, ax, out / "wall_clock.png", legend_size=8)

    rows = truncation_rows(records)
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ref_group = truncation_reference(records)[1]
        for r in rows:
            xs, ys = zip(*mean_curve(records, r["name"], ref_group if r is rows[0] else "truncation"))
            ax.plot(xs, ys, marker=".", label=f"{r['label']} ({r['seeds']} seeds)",
                    color="k" if r is rows[0] else None, linestyle="--" if r["name"] == CEILING else "-")
        ax.set(xlabel="step", ylabel="validation loss (mean over seeds)", title="Truncation at τ = 2, α = 0.9")
        made["truncation"] = _save(plt, fig, ax, out / "truncation.png", legend_size=8)
    return made


def _save(plt, fig, ax, path: Path, legend_size=None) -> str:
    """Finish and write one plot; its file name, for the report's link."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
