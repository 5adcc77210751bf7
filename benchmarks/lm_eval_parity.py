"""lm-evaluation-harness (HFLM, transformers backend) against elo on the same first-N documents of each task:
metrics side by side (they must agree within 0.5 points) and log-likelihood requests per second.

lm-eval runs its own task YAMLs, with the dataset pointed at the local files (`dataset_path: json`), through
`simple_evaluate`; elo runs elo.evaluation.tasks + elo.evaluation.scoring. Both use the same converted default-model directory in fp32 on
the same threads. Timed: for lm-eval, `HFLM.loglikelihood` (tokenization + model); for elo, `encode_pair` +
`loglikelihoods`, the same work. Each task runs lm-eval then elo, `--repeats` times, and each side's fastest run
counts, so that a load spike from other processes does not decide the ratio.

    python benchmarks/lm_eval_parity.py [--tasks kobest_copa,mmlu] [--limit 100] [--num-fewshot K]
        [--batch-size 16] [--batch-tokens 8192] [--threads 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elo  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from elo.evaluation import scoring, tasks  # noqa: E402
from elo.tools.jsonl import read_jsonl  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
TOLERANCE_POINTS = 0.5
KOBEST_SPLITS = {"train": "train", "validation": "dev", "test": "test"}


def lm_eval_sources(name: str) -> tuple[str, dict[str, str]]:
    """lm-eval's YAML (under lm_eval/tasks) for one of our tasks, and its HF split names -> our files."""
    if name.startswith("kobest_"):
        short = name[len("kobest_"):]
        return f"kobest/{name}.yaml", {s: f"kobest/{short}_{f}.jsonl" for s, f in KOBEST_SPLITS.items()}
    if name.startswith("mmlu_"):
        return f"mmlu/default/{name}.yaml", {"test": "mmlu/test_12subjects.jsonl", "dev": "mmlu/dev_12subjects.jsonl"}
    if name == "jcommonsenseqa":
        return ("japanese_leaderboard/ja_leaderboard_jcommonsenseqa.yaml",
                {"train": "jglue/jcommonsenseqa_v1.3_train.jsonl", "validation": "jglue/jcommonsenseqa_v1.3_valid.jsonl"})
    # lm-eval loads JNLI's few-shot (train) split when building the task; it is absent here and unread at 0 shots
    return ("japanese_leaderboard/ja_leaderboard_jnli.yaml",
            {"train": "jglue/jnli_v1.3_valid.jsonl", "validation": "jglue/jnli_v1.3_valid.jsonl"})


def lm_eval_config(name: str, data_dir: Path, tmp: Path) -> dict:
    """lm-eval's task config for `name` reading local files shaped as the HF datasets it normally downloads: the
    task's fields only, MMLU restricted to the subject, JNLI labels as the HF JGLUE ClassLabel ids."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    task = tasks.TASKS[name]
    yaml_file, splits = lm_eval_sources(name)
    files = {}
    for split, rel in splits.items():
        records = [{k: r[k] for k in task.fields} for _, r in read_jsonl(data_dir / rel)]
        if task.keep is not None:
            records = [r for r in records if task.keep(r)]
        if name == "jnli":
            records = [{**r, "label": tasks.JNLI_LABELS.index(r["label"])} for r in records]
        files[split] = tmp / f"{name}.{split}.jsonl"
        files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()}, "cache_dir": str(tmp / "hf")})
    return cfg


def run_lm_eval(lm, members: list[str], args, tmp: Path) -> tuple[dict[str, dict], int, float]:
    """Metrics per member task, requests scored and seconds spent in HFLM.loglikelihood."""
    from lm_eval.evaluator import simple_evaluate

    spent, count = [0.0], [0]
    original = type(lm).loglikelihood

    def timed(requests, disable_tqdm=False):
        t = time.perf_counter()
        out = original(lm, requests, disable_tqdm=True)
        spent[0] += time.perf_counter() - t
        count[0] += len(requests)
        return out

    lm.loglikelihood = timed
    configs = [lm_eval_config(m, args.data_dir, tmp) for m in members]
    res = simple_evaluate(model=lm, tasks=configs, limit=args.limit, num_fewshot=args.num_fewshot,
                          bootstrap_iters=0, log_samples=False)
    metrics = {}
    for m in members:
        key = tasks.TASKS[m].lm_eval_name
        metrics[m] = {k.split(",")[0]: v for k, v in res["results"][key].items()
                      if k.endswith(",none") and "stderr" not in k}
        metrics[m]["n"] = res["n-samples"][key]["effective"]
    return metrics, count[0], spent[0]


def run_elo(model, tokenizer, members: list[str], args) -> tuple[dict[str, dict], int, float]:
    instances = {m: tasks.build_instances(tasks.TASKS[m], args.data_dir, args.num_fewshot, args.limit) for m in members}
    t = time.perf_counter()
    requests = [scoring.encode_pair(tokenizer, i.context, c) for m in members for i in instances[m] for c in i.continuations]
    lls = iter(scoring.loglikelihoods(model, requests, args.batch_tokens))
    spent = time.perf_counter() - t
    metrics = {m: tasks.compute_metrics(tasks.TASKS[m], instances[m], [[next(lls) for _ in i.choices] for i in instances[m]])
               for m in members}
    return metrics, len(requests), spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--tasks", default="kobest_copa,mmlu")
    p.add_argument("--limit", type=int, default=100, help="first N documents of each task (MMLU: of each subject)")
    p.add_argument("--num-fewshot", type=int, help="default: each task's lm-eval default")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    p.add_argument("--batch-tokens", type=int, default=8192, help="elo's padded tokens per batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side; the fastest counts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    print(f"machine: {machine()}")
    directory = elo.resolve(args.model)
    groups = tasks.expand([n.strip() for n in args.tasks.split(",") if n.strip()])
    lm = HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=args.batch_size)
    model, tokenizer = elo.load_model(directory), elo.load_tokenizer(directory)
    print(f"model: {directory}; lm-eval batch_size={args.batch_size}, elo batch_tokens={args.batch_tokens}, "
          f"limit={args.limit}, num_fewshot={args.num_fewshot if args.num_fewshot is not None else 'task default'}, "
          f"repeats={args.repeats} (fastest counts)\n")
    with torch.no_grad():  # warm both models up before timing
        lm.model(torch.ones(1, 8, dtype=torch.long))
        model(torch.ones(1, 8, dtype=torch.long))

    rows, speed, worst = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, members in groups.items():
            ref_s = our_s = float("inf")
            for _ in range(args.repeats):  # alternate, keep each side's fastest run: load spikes hit one run, not all
                ref, ref_n, seconds = run_lm_eval(lm, members, args, Path(tmp))
                ref_s = min(ref_s, seconds)
                ours, our_n, seconds = run_elo(model, tokenizer, members, args)
                our_s = min(our_s, seconds)
            if ref_n != our_n:
                raise SystemExit(f"{name}: lm-eval scored {ref_n} requests, elo {our_n}")
            if name not in members:  # a group: lm-eval's size-weighted mean over its subtasks
                ref[name] = tasks.aggregate([ref[m] for m in members])
                ours[name] = tasks.aggregate([ours[m] for m in members])
            for metric in (k for k in ours[name] if k != "n"):
                diff = 100 * abs(ours[name][metric] - ref[name][metric])
                worst = max(worst, diff)
                rows.append(f"| {name} | {metric} | {ours[name]['n']} | {100 * ref[name][metric]:.2f} | "
                            f"{100 * ours[name][metric]:.2f} | {diff:.2f} |")
            speed.append(f"| {name} | {our_n} | {ref_n / ref_s:.1f} | {our_n / our_s:.1f} | "
                         f"{(our_n / our_s) / (ref_n / ref_s):.2f}x |")
    print("| task | metric | docs | lm-eval | elo | abs diff (points) |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| task | requests | lm-eval req/s | elo req/s | elo / lm-eval |\n|---|---|---|---|---|")
    print("\n".join(speed))
    verdict = "PASS" if worst <= TOLERANCE_POINTS else "FAIL"
    print(f"\n{verdict}: largest metric difference {worst:.2f} points (tolerance {TOLERANCE_POINTS})")
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
