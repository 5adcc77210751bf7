"""The pipeline's report: report.json and report.md in the run directory, with loss curves and the comparison as
PNG figures when matplotlib (the `plot` extra) is installed.

Per stage: wall time (the pipeline's clock, every attempt that finished), training time (the sum of step times in
metrics.jsonl, so a resumed run counts each step once), trained tokens (elo_run.json), tokens read per second, final
losses. Per evaluated model: held-out perplexity per language and the task metrics, as evaluate.py wrote them. Every
number comes with the command that reproduces it.
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import shlex
import time
from pathlib import Path

import torch

from elo.tools.files import atomic_file, atomic_write_text
from elo.train.run_dir import RunDir


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def stage_summary(p, name: str, timings: dict) -> dict:
    """One stage's numbers from its run directory."""
    stage = p.stages[name]
    summary: dict = {"wall_s": round(sum(timings.get(name, [])), 3), "output": str(stage.model),
                     "command": shlex.join(p.commands(stage)[name])}
    if name == "chat_vector":
        return summary
    records = RunDir(stage.out).records()
    steps = [r for r in records if "loss" in r]
    provenance = json.loads((stage.model / "elo_run.json").read_text())
    train_s = sum(r["step_time_s"] for r in steps)
    read = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)  # tokens the model read (the loop's throughput)
    final = {k: v for r in records for k, v in r.items() if k.startswith(("val_loss/", "base_val_loss/"))}
    summary |= {"steps": provenance["steps"], "tokens": provenance["tokens"], "train_s": round(train_s, 3),
                "tokens_per_s": round(read / train_s, 1) if train_s else None,
                "final_loss": steps[-1]["loss"] if steps else None, "val_loss": final}
    return summary


def evaluation_summary(p) -> dict:
    stage = p.stages.get("evaluate")
    if stage is None:
        return {}
    out = {}
    for name, command in p.commands(stage).items():
        results = json.loads((stage.out / f"{name}.json").read_text())
        out[name] = {"model": results["model"],
                     "heldout": {lang: {"perplexity": r["perplexity"], "nll_per_token": r["nll_per_token"],
                                        "tokens": r["tokens"]} for lang, r in results.get("heldout", {}).items()},
                     "tasks": results.get("tasks", {}),
                     "command": shlex.join(command)}
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None when the `plot` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    with atomic_file(path, "wb") as f:
        f.write(buffer.getvalue())


def figures(p, report: dict, plt) -> list[str]:
    """loss.png (training and held-out loss per training stage, against tokens) and comparison.png (held-out
    perplexity per language and task scores per model); returns the file names written."""
    written = []
    trained = [n for n in report["stages"] if "steps" in report["stages"][n]]
    if trained:
        fig, axes = plt.subplots(1, len(trained), figsize=(4.5 * len(trained), 3.5), squeeze=False)
        for ax, name in zip(axes[0], trained):
            records = RunDir(p.stages[name].out).records()
            steps = [r for r in records if "loss" in r]
            ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], label="train", lw=1)
            langs = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("val_loss/")})
            for lang in langs:
                points = [(r["tokens"], r[f"val_loss/{lang}"]) for r in records if f"val_loss/{lang}" in r]
                ax.plot(*zip(*points), marker="o", ms=3, label=f"held-out {lang}")
            ax.set(title=name, xlabel="tokens", ylabel="loss")
            ax.legend(fontsize=7)
        _save(fig, p.out / "loss.png")
        plt.close(fig)
        written.append("loss.png")
    evaluation = report["evaluation"]
    if evaluation:
        models = list(evaluation)
        langs = sorted({lang for e in evaluation.values() for lang in e["heldout"]})
        tasks = list(dict.fromkeys(t for e in evaluation.values() for t in e["tasks"]))
        panels = [("held-out perplexity " + lang, [evaluation[m]["heldout"].get(lang, {}).get("perplexity")
                                                   for m in models]) for lang in langs]
        panels += [(f"{t} " + ("f1" if "f1" in evaluation[models[0]]["tasks"].get(t, {}) else "acc"),
                    [(evaluation[m]["tasks"].get(t) or {}).get("f1", (evaluation[m]["tasks"].get(t) or {}).get("acc"))
                     for m in models]) for t in tasks]
        if panels:
            fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3.2), squeeze=False)
            for ax, (title, values) in zip(axes[0], panels):
                ax.bar(models, [v if v is not None else 0 for v in values])
                known = [v for v in values if v is not None]
                if known:  # the axis spans the values, not 0: the differences are what the panel is for
                    low, high = min(known), max(known)
                    pad = (high - low) * 0.25 or abs(high) * 0.05 or 0.05
                    ax.set_ylim(low - pad, high + pad)
                ax.set_title(title, fontsize=9)
                ax.tick_params(axis="x", labelsize=8)
                plt.setp(ax.get_xticklabels(), rotation=40, ha="right")  # right-anchored: long names do not collide
            _save(fig, p.out / "comparison.png")
            plt.close(fig)
            written.append("comparison.png")
    return written


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _score(task: dict | None) -> float | None:
    """A task's headline score: macro F1 where the task reports it (KoBEST, as the paper), else accuracy."""
    return None if not task else task.get("f1", task.get("acc"))


def _stderr(task: dict | None) -> float | None:
    score, n = _score(task), (task or {}).get("n")
    return None if score is None or not n else math.sqrt(score * (1 - score) / n)


def _task_cell(task: dict | None) -> str:
    if not task:
        return "-"
    se, n = _stderr(task), task.get("n")
    return f"{_score(task):.1%}".rstrip("%") + (f" ± {se:.1%}".rstrip("%") + f" (n={n})" if se is not None else "")


def _best(column: str, values: dict[str, float | None]) -> str | None:
    known = {m: v for m, v in values.items() if v is not None}
    if len(known) < 2:
        return None
    return (min if column.endswith("ppl") else max)(known, key=known.get)


def reading(evaluation: dict, columns: dict[str, dict], best: dict[str, str | None]) -> str:
    """One paragraph, computed from the numbers: per column, the best model against the base, and whether task
    differences exceed two standard errors (perplexity carries no noise estimate here: one pass over fixed text)."""
    parts = []
    for column, values in columns.items():
        winner = best[column]
        if winner is None:
            continue
        base = values.get("base")
        if column.endswith("ppl"):
            versus = f" (base {base:.3f})" if base is not None and winner != "base" else ""
            parts.append(f"lowest {column}: {winner}, {values[winner]:.3f}{versus}")
            continue
        se = max((_stderr(evaluation[m]["tasks"].get(column)) or 0.0) for m in (winner, "base") if m in evaluation)
        if base is None or winner == "base":
            parts.append(f"{column}: best {winner} ({values[winner]:.1%})")
        elif values[winner] - base > 2 * se:
            parts.append(f"{column}: {winner} beats base by {values[winner] - base:.1%}, more than 2 standard errors")
        else:
            parts.append(f"{column}: best {winner} ({values[winner]:.1%}) but within 2 standard errors of base "
                         f"({base:.1%}, ±{se:.1%}): no model differs from the base beyond noise")
    for column, values in columns.items():  # the question the control answers: does ELO add to the alignment tokens?
        elo, alone = values.get("align"), values.get("control")
        if column.endswith("ppl") and elo is not None and alone is not None:
            verdict = "lower with ELO's layers" if elo < alone else "no lower with ELO's layers"
            parts.append(f"ELO + alignment vs alignment alone (control), {column}: {elo:.3f} vs {alone:.3f}, {verdict} "
                         f"(one run each: compare the gap with the spread between data orders)")
    return "; ".join(parts) + "." if parts else "nothing to compare (fewer than two models scored)."


def markdown(report: dict) -> str:
    lines = [f"# Pipeline report: {Path(report['recipe']).name}", "",
             f"Run directory `{report['out']}`, written {report['written']}. Machine: "
             + ", ".join(f"{k} {v}" for k, v in report["machine"].items()) + f"; {report['nproc']} process(es)."
             + (f" Overrides: `{' '.join(report['overrides'])}`." if report.get("overrides") else ""), "",
             "## Stages", "", "| stage | wall s | train s | steps | tokens | tokens/s | final loss | held-out loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        val = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in s.get("val_loss", {}).items()
                        if k.startswith("val_loss/"))
        lines.append(f"| {name} | {s['wall_s']:.1f} | {_fmt(s.get('train_s'), '.1f')} | {s.get('steps', '-')} | "
                     f"{s.get('tokens', '-')} | {_fmt(s.get('tokens_per_s'), ',.0f')} | "
                     f"{_fmt(s.get('final_loss'))} | {val or '-'} |")
    lines += ["", "wall s: the pipeline's clock for the stage (loading, training, validation, export; every attempt that "
              "finished). train s: the sum of step times in metrics.jsonl (each step once, however often the run was "
              "resumed). tokens: the target tokens the loss covered (SFT: assistant tokens only). tokens/s: the tokens "
              "the model read per second of training, as the training log counts them. The train "
              "stage's losses are the 2-layer ELO submodel's alone; its spliced model is scored below as `train`."]
    evaluation = report["evaluation"]
    if evaluation:
        langs = sorted({lang for e in evaluation.values() for lang in e["heldout"]})
        tasks = list(dict.fromkeys(t for e in evaluation.values() for t in e["tasks"]))
        lines += ["", "## Evaluation", "", "Held-out perplexity: the text the ELO run set aside (none of it trained "
                  "on by any stage), scored per language with `evaluate.py --ppl-heldout`. Evaluating took "
                  f"{report['evaluation_wall_s']} s of wall time.", "",
                  "| model | " + " | ".join([f"{l} held-out ppl" for l in langs] + tasks) + " |",
                  "|---" * (1 + len(langs) + len(tasks)) + "|"]
        columns = {f"{l} held-out ppl": {m: e["heldout"].get(l, {}).get("perplexity") for m, e in evaluation.items()}
                   for l in langs}
        columns |= {t: {m: _score(e["tasks"].get(t)) for m, e in evaluation.items()} for t in tasks}
        best = {c: _best(c, values) for c, values in columns.items()}
        for m, e in evaluation.items():
            cells = []
            for c, values in columns.items():
                text = _fmt(values[m], ".3f") if c.endswith("ppl") else _task_cell(e["tasks"].get(c))
                cells.append(f"**{text}**" if m == best[c] else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "Bold: the best model in each column. Tasks: KoBEST tasks report macro F1, others accuracy, in %, "
                  "± the binomial standard error of a score over n examples (sqrt(p (1 - p) / n)), n the examples "
                  "scored.", "", "**Reading.** " + reading(evaluation, columns, best)]
    if report["figures"]:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    lines += ["", "## Commands", "", "Each number above is reproduced by:", "", "```bash"]
    lines += [f"# stage {n}\n{s['command']}" for n, s in report["stages"].items()]
    lines += [f"# evaluate {m}\n{e['command']}" for m, e in evaluation.items()]
    lines += ["```", ""]
    return "\n".join(lines)


def write_report(p, timings: dict) -> Path:
    """Write report.json, report.md and (with matplotlib) the figures into the run directory; returns report.md."""
    report = {"recipe": str(p.recipe), "overrides": p.overrides, "out": str(p.out), "nproc": p.nproc, "machine": machine(),
              "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "stages": {n: stage_summary(p, n, timings) for n in p.stages if n != "evaluate"},
              "evaluation": evaluation_summary(p), "evaluation_wall_s": round(sum(timings.get("evaluate", [])), 1)}
    plt = _pyplot()
    report["figures"] = figures(p, report, plt) if plt is not None else []
    if plt is None:
        print("report: matplotlib is not installed (pip install 'elo-llm[plot]'); writing it without figures",
              flush=True)
    atomic_write_text(p.out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(p.out / "report.md", markdown(report))
    return p.out / "report.md"
