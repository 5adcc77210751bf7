"""Evaluation results as Markdown: one run's table, and several runs side by side in the shape of the paper's
Table 1 (models as rows, benchmarks as columns)."""
from __future__ import annotations

import json
from pathlib import Path

from elo.evaluation import tasks

KOBEST = [t for t in tasks.TASKS if t.startswith("kobest_")]
# Table 1 columns: (label, section of the results file, entry, metric); KoBEST is reported as macro F1
COLUMNS = (
    *[(f"KoBEST {t.split('_')[1]} F1", "tasks", t, "f1") for t in KOBEST],
    ("MMLU", "tasks", "mmlu", "acc"),
    ("JCommonsenseQA", "tasks", "jcommonsenseqa", "acc"),
    ("JNLI", "tasks", "jnli", "acc"),
    ("LogicKor", "generation", "logickor", "overall"),
    ("MT-Bench", "generation", "mt_bench", "overall"),
    ("MT-Bench ja", "generation", "mt_bench_ja", "overall"),
)
FORMATS = {"tasks": "{:.2%}", "generation": "{:.2f}", "perplexity": "{:.4f}", "heldout": "{:.4f}"}


def _check_results(run: object, path: Path) -> dict:
    """`run` if it has the shape evaluate.py writes (sections of entries of numbers); else a one-line error."""
    if not isinstance(run, dict) or not any(section in run for section in FORMATS):
        raise ValueError(f"{path}: not an elo results file (expected a JSON object with a 'perplexity', 'tasks' or "
                         f"'generation' section, as evaluate.py writes)")
    for section in FORMATS:
        entries = run.get(section, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: '{section}' is a {type(entries).__name__}; expected an object")
        for entry, metrics in entries.items():
            if metrics is None and section == "generation":  # answers generated but not judged
                continue
            if not isinstance(metrics, dict):
                raise ValueError(f"{path}: '{section}.{entry}' is {metrics!r}; expected an object of metrics")
            for metric in ("f1", "acc", "overall", "bits_per_byte"):
                value = metrics.get(metric)
                if not (value is None or isinstance(value, (int, float)) and not isinstance(value, bool)):
                    raise ValueError(f"{path}: '{section}.{entry}.{metric}' is {value!r}; expected a number")
    return run


def results_table(results: dict) -> str:
    """One run: a row per metric (perplexity per language, task metrics, judge scores)."""
    rows = ["| benchmark | metric | value | n |", "|---|---|---|---|"]
    for lang, r in results.get("perplexity", {}).items():
        for metric in ("nll_per_token", "perplexity", "bits_per_byte"):
            rows.append(f"| ppl {lang} | {metric} | {r[metric]:.4f} | {r['docs']} docs, {r['tokens']} tokens |")
    for lang, r in results.get("heldout", {}).items():
        for metric in [m for m in ("nll_per_token", "perplexity", "bits_per_byte") if m in r]:  # older: no bytes
            rows.append(f"| held-out {lang} | {metric} | {r[metric]:.4f} | {r['windows']} windows, {r['tokens']} "
                        f"tokens |")
    for name, r in results.get("tasks", {}).items():
        for metric, value in r.items():
            if metric != "n":
                rows.append(f"| {name} | {metric} | {FORMATS['tasks'].format(value).rstrip('%')} | {r['n']} |")
    for bench, r in results.get("generation", {}).items():
        if r is not None:
            overall = "-" if r["overall"] is None else f"{r['overall']:.2f}"
            rows.append(f"| {bench} | judge score | {overall} | {r['n_judged']} judged, {r['n_failed']} failed |")
    return "\n".join(rows)


def compare_table(paths: list[Path]) -> str:
    """Models as rows, benchmarks as columns (the shape of the paper's Table 1); only columns some file has."""
    runs = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} not found")
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a results JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a results JSON (not UTF-8 text)") from None
        runs.append(_check_results(run, path))
    langs = list(dict.fromkeys(lang for r in runs for lang in r.get("perplexity", {})))
    heldout = list(dict.fromkeys(lang for r in runs for lang in r.get("heldout", {})))
    columns = [*COLUMNS, *[(f"{lang} bits/byte", "perplexity", lang, "bits_per_byte") for lang in langs],
               *[(f"{lang} held-out ppl", "heldout", lang, "perplexity") for lang in heldout],
               *[(f"{lang} held-out bits/byte", "heldout", lang, "bits_per_byte") for lang in heldout]]
    for run in runs:  # the KoBEST average where all five tasks ran
        if all((run.get("tasks", {}).get(t) or {}).get("f1") is not None for t in KOBEST):
            run["tasks"]["kobest_avg"] = {"f1": sum(run["tasks"][t]["f1"] for t in KOBEST) / len(KOBEST)}
    columns.insert(len(KOBEST), ("KoBEST avg F1", "tasks", "kobest_avg", "f1"))

    def cell(run: dict, section: str, entry: str, metric: str) -> str | None:
        value = (run.get(section, {}).get(entry) or {}).get(metric)
        return None if value is None else FORMATS[section].format(value).rstrip("%")

    table = [[cell(run, *col[1:]) for col in columns] for run in runs]
    keep = [j for j in range(len(columns)) if any(row[j] is not None for row in table)]
    names = [f"{r.get('model', '?')} ({p.name})" for r, p in zip(runs, paths)]
    lines = ["| model | " + " | ".join(columns[j][0] for j in keep) + " |", "|---" * (len(keep) + 1) + "|"]
    for name, row in zip(names, table):
        lines.append(f"| {name} | " + " | ".join(row[j] or "-" for j in keep) + " |")
    return "\n".join(lines)
