"""Evaluate a model: per-language perplexity, lm-evaluation-harness-identical log-likelihood benchmarks, and
MT-Bench-style generation graded by an LLM judge; or compare result files side by side.

    python evaluate.py --model M --ppl ko=ko.jsonl --ppl en=en.jsonl [--max-docs N] [--seq-len L] --out results.json
    python evaluate.py --model M --ppl-heldout runs/elo-ko     # exactly the text a train.py / align.py run held out
    python evaluate.py --model M --tasks kobest_copa,mmlu [--data-dir DIR] [--num-fewshot K] [--limit N]
    python evaluate.py --model M --generate mt_bench --data-dir DIR --judge-url URL --judge-model NAME
        [--judge-key-env VAR]
    python evaluate.py --compare a.json b.json ...

Perplexity files are JSON Lines with a "text" field. Task names and their lm-eval counterparts:
elo/evaluation/tasks.py. Tasks read the Hugging Face Hub dataset lm-eval reads (cached by huggingface_hub; offline,
HF_HUB_OFFLINE=1, from that cache) unless `--data-dir DIR` names a folder of the same benchmarks as JSONL files
(examples/data/eval holds KoBEST COPA); --generate reads its questions from --data-dir.
`--ppl-heldout RUN_DIR` rebuilds the token stream of a training run from its train_config.json (the run's tokenizer,
data, field, seq_len, val_tokens) and scores the held-out windows its validation used, per language: text that run
never trained on. Progress per perplexity file and per task (requests done / total, elapsed, ETA) goes to stderr, at
most every 10% and 5 s.
Every option, file and --out is checked before the model loads; a bad one is a one-line `error: ...` with exit
status 2 (`--debug` shows the traceback). The table is printed before the results file is written. Exit status 2
also when a judge was given but graded nothing (its judgments file says why; rerunning judges only what failed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import elo
from elo.data.sources import source_digests
from elo.data.text import Corpus, tokenize_files
from elo.evaluation import scoring, tasks
from elo.evaluation.generate import QUESTION_FILES, generate_answers
from elo.evaluation.judge import check_reachable, judge_answers
from elo.hf.checkpoint import load_config
from elo.tools.cli import ArgumentParser, fail
from elo.tools.files import atomic_write_text, sha256_file
from elo.tools.jsonl import read_jsonl
from elo.evaluation.results import compare_table, results_table

GENERATION_BENCHES = ("mt_bench", "mt_bench_ja", "logickor")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_ppl(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        lang, sep, path = spec.partition("=")
        if not sep or not lang or not path:
            raise ValueError(f"--ppl {spec!r}: expected LANG=PATH, e.g. ko=../shared/data/pretrain/ko_wikipedia.jsonl")
        if lang in out:  # one perplexity per language: a second file would silently replace the first
            raise ValueError(f"--ppl {lang} is given twice ({out[lang]} and {path}); expected one file per language")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--ppl {lang}: file {path} not found")
        out[lang] = Path(path)
    return out


def load_texts(path: Path, max_docs: int | None) -> list[str]:
    records = read_jsonl(path)[:max_docs]
    for n, record in records:
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{n}: expected a string field \"text\"")
    texts = [r["text"] for _, r in records]
    if not any(texts):
        raise ValueError(f"--ppl file {path} has no text to score (no records, or only empty \"text\" fields)")
    return texts


class Progress:
    """lm-eval-style progress on stderr: `label: done/total (pct) elapsed Xs, eta Ys`, printed when at least 10% more
    is done and 5 s have passed since the last line (or 60 s have), and once at the end."""

    def __init__(self, label: str):
        self.label, self.start = label, time.monotonic()
        self.last_time, self.last_done = self.start, 0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        step = done - self.last_done >= total / 10 and now - self.last_time >= 5
        if done < total and not step and now - self.last_time < 60:
            return
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else float("nan")
        print(f"{self.label}: {done}/{total} requests ({done / total:.0%}), elapsed {elapsed:.0f}s, eta {eta:.0f}s",
              file=sys.stderr, flush=True)
        self.last_time, self.last_done = now, done


def heldout_plan(run_dir: Path) -> dict:
    """What a training run held out, from its train_config.json: {tokenizer, seq_len, val_tokens, field, cache_dir,
    data}. Cheap: reads one JSON file."""
    config_file = Path(run_dir) / "train_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--ppl-heldout {run_dir}: no train_config.json; expected a train.py or align.py "
                                f"run directory")
    config = json.loads(config_file.read_text())
    if "text_field" not in config:
        raise ValueError(f"--ppl-heldout {run_dir}: not a text run (train.py or align.py); its held-out data is "
                         f"not text")
    return {"tokenizer": config.get("base") or config["model"], "seq_len": config["seq_len"],
            "val_tokens": config["val_tokens"], "field": config["text_field"], "cache_dir": config["cache_dir"],
            "data": config["data"]}


def heldout_windows(plan: dict, tokenizer) -> dict[str, np.ndarray]:
    """Per language, the run's held-out windows [n, seq_len + 1] (input w[:-1], target w[1:]), exactly as its
    validation read them: the run's token cache (rebuilt with the run's tokenizer if missing), split by
    elo.data.text.Corpus."""
    out = {}
    for lang, files in sorted(plan["data"].items()):
        tokens, _, _ = tokenize_files(files, tokenizer, plan["cache_dir"], plan["field"])
        corpus = Corpus(lang, tokens, plan["seq_len"], plan["val_tokens"])
        out[lang] = np.stack([corpus.val_window(i) for i in range(corpus.num_val)]).astype(np.int64)
    return out


def heldout_perplexity(model, tokenizer, windows: np.ndarray, batch_tokens: int, label: str) -> dict[str, float]:
    """Mean NLL per target token, perplexity and bits per byte over held-out windows (the first token of each is
    context only). Bytes: the UTF-8 length of each window's decoded targets; a character split by a window's edge
    decodes as one replacement character (3 bytes), so the byte count is off by at most a few bytes per window."""
    seq_len = windows.shape[1] - 1
    requests = [([int(w[0])], w[1:].tolist()) for w in windows]
    nll = -sum(scoring.loglikelihoods(model, requests, batch_tokens, max_length=seq_len, progress=Progress(label)))
    tokens = windows.shape[0] * seq_len
    n_bytes = sum(len(tokenizer.decode(targets).encode("utf-8")) for _, targets in requests)
    return {"windows": windows.shape[0], "seq_len": seq_len, "tokens": tokens, "bytes": n_bytes,
            "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / n_bytes}


def check_options(args: argparse.Namespace) -> None:
    """Every number against its range, and the output path, before anything is read or loaded."""
    at_least = {"--max-docs": (args.max_docs, 1), "--limit": (args.limit, 1), "--seq-len": (args.seq_len, 1),
                "--batch-tokens": (args.batch_tokens, 1), "--num-fewshot": (args.num_fewshot, 0),
                "--max-new-tokens": (args.max_new_tokens, 1)}
    for option, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ValueError(f"{option} {value}: expected an integer >= {low}" + (" (omit it for all)" if option in
                                                                                  ("--max-docs", "--limit") else ""))
    if not (math.isfinite(args.judge_deadline) and args.judge_deadline > 0):
        raise ValueError(f"--judge-deadline {args.judge_deadline}: expected a positive number of seconds")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r}: not a device; expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    check_out(args.out)


def check_out(out: Path) -> None:
    """`--out` must be a file path elo can write: not a directory, inside a directory it may create files in."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; expected a results file path such as {out / 'results.json'}")
    parent = next(p for p in (out.parent.absolute(), *out.parent.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a directory")
    try:  # an anonymous file, gone when closed: the one sure test of "can write here" (read-only mounts, ACLs)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None


def split_names(value: str | None) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()] if value else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=elo.DEFAULT_MODEL, help="HF model directory, hub id or the default model")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--ppl", action="append", default=[], metavar="LANG=PATH", help="JSONL with a 'text' field")
    p.add_argument("--ppl-heldout", type=Path, metavar="RUN_DIR", help="perplexity per language on exactly the text "
                   "a train.py / align.py run held out")
    p.add_argument("--max-docs", type=int, help="score only the first N documents of each --ppl file")
    p.add_argument("--seq-len", type=int, help="predicted tokens per rolling window (default: the model's context)")
    p.add_argument("--tasks", help=f"comma-separated, from: {', '.join(tasks.known_names())}")
    p.add_argument("--data-dir", type=Path, help="benchmarks as JSONL files, offline (default for --tasks: the Hugging "
                   "Face Hub datasets lm-eval reads)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's lm-eval default)")
    p.add_argument("--limit", type=int, help="evaluate only the first N documents of each task (MMLU: subject), "
                                             "and answer only the first N questions of each --generate benchmark")
    p.add_argument("--generate", help=f"comma-separated, from: {', '.join(GENERATION_BENCHES)}")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--gen-batch", type=int, default=8, help="questions --generate answers at once")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint grading the generated answers")
    p.add_argument("--judge-model")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument("--judge-deadline", type=float, default=1800.0,
                   help="seconds the judge gets per benchmark in all; what is left is recorded as skipped, for a rerun")
    p.add_argument("--out", type=Path, default=Path("results.json"))
    p.add_argument("--compare", nargs="+", type=Path, metavar="RESULTS", help="print result files side by side")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(argv)


def answer_and_judge(args: argparse.Namespace, model, tokenizer, benches: list[str], results: dict) -> None:
    """--generate: answer each benchmark's questions (appending to an answers file beside --out), then grade them
    with the judge when one is given; fills results["generation"] bench by bench."""
    for bench in benches:
        answers = args.out.with_name(f"{args.out.stem}.{bench}.answers.jsonl")
        generate_answers(model, tokenizer, bench, args.data_dir, answers, max_new_tokens=args.max_new_tokens,
                         batch_size=args.gen_batch, limit=args.limit)
        questions = args.data_dir / QUESTION_FILES[bench]
        results["data_files"][str(questions)] = sha256_file(questions)
        results["generation"][bench] = None
        if args.judge_url:
            results["generation"][bench] = judge_answers(answers, bench, args.data_dir, args.judge_url,
                                                         args.judge_model, api_key_env=args.judge_key_env,
                                                         deadline_s=args.judge_deadline)
        else:
            print(f"{bench}: answers in {answers}; not graded (no --judge-url): rerun with --judge-url URL "
                  f"--judge-model NAME to grade them", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        print(compare_table(args.compare))
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    # check every input before loading the model
    check_options(args)
    ppl_files = parse_ppl(args.ppl)
    groups = tasks.expand(split_names(args.tasks))
    members = list(dict.fromkeys(t for ts in groups.values() for t in ts))
    task_files = {f for t in members for f in tasks.data_files(tasks.TASKS[t], args.data_dir, args.num_fewshot)}
    for f in task_files:  # Hub files are there once data_files returns; a data dir's are checked here
        if not f.is_file():
            raise FileNotFoundError(f"data file {f} not found (is --data-dir {args.data_dir} right?)")
    benches = split_names(args.generate)
    for b in benches:
        if b not in GENERATION_BENCHES:
            raise ValueError(f"unknown --generate benchmark {b!r}; known: {', '.join(GENERATION_BENCHES)}")
    if args.gen_batch < 1:
        raise ValueError(f"--gen-batch must be >= 1, got {args.gen_batch}")
    if args.judge_url and not args.judge_model:
        raise ValueError("--judge-url needs --judge-model (the model name the endpoint serves)")
    if benches and args.data_dir is None:
        raise ValueError(f"--generate {args.generate} reads its questions from --data-dir (laid out as "
                         f"shared/data/eval is: mt_bench/, mt_bench_ja/, logickor/); pass --data-dir DIR")
    heldout = heldout_plan(args.ppl_heldout) if args.ppl_heldout else None
    if not (ppl_files or heldout or members or benches):
        raise ValueError("nothing to evaluate: give --ppl, --ppl-heldout, --tasks or --generate (or --compare)")
    context = load_config(elo.resolve(args.model)).max_position_embeddings
    texts = {lang: load_texts(path, args.max_docs) for lang, path in ppl_files.items()}
    if args.seq_len is not None and args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {context} tokens")
    if benches and args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {context} tokens")
    if benches and args.judge_url:
        check_reachable(args.judge_url)

    start = time.time()
    model = elo.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if model.config.elo is not None:
        print(f"note: {args.model} is an ELO submodel ({len(model.config.layer_ids)} of "
              f"{model.config.elo['base_num_hidden_layers']} layers of {model.config.elo['base']}), not a whole model: "
              f"its scores are the submodel's own; splice it into its base first (align.py --save-spliced, or "
              f"elo.splice_checkpoint) to evaluate ELO", file=sys.stderr, flush=True)
    tokenizer = elo.load_tokenizer(args.model)
    seq_len = args.seq_len or context
    results: dict = {
        "model": args.model,
        "tokenizer_digest": tokenizer.digest,
        "settings": {
            "dtype": args.dtype, "device": args.device, "batch_tokens": args.batch_tokens, "torch": torch.__version__,
            "seq_len": seq_len if ppl_files else None, "max_docs": args.max_docs,
            "num_fewshot": {t: tasks.fewshot_count(tasks.TASKS[t], args.num_fewshot, args.data_dir) for t in members},
            "fewshot_seed": tasks.FEWSHOT_SEED, "limit": args.limit,
        },
        "data_files": {str(f): sha256_file(f) for f in [*ppl_files.values(), *sorted(task_files)]},
    }
    if ppl_files:
        results["perplexity"] = {
            lang: scoring.perplexity(model, tokenizer, texts[lang], seq_len, args.batch_tokens,
                                     Progress(f"ppl {lang}")) for lang in texts
        }
    if heldout:
        heldout_tokenizer = elo.load_tokenizer(heldout["tokenizer"])
        windows = heldout_windows(heldout, heldout_tokenizer)
        if max(int(w.max()) for w in windows.values()) >= model.config.vocab_size:
            raise ValueError(f"--ppl-heldout {args.ppl_heldout}: its tokenizer ({heldout['tokenizer']}) has ids beyond "
                             f"the model's vocabulary of {model.config.vocab_size}")
        results["heldout_run"] = str(args.ppl_heldout.resolve())
        results["data_files"] |= source_digests(s for sources in heldout["data"].values() for s in sources)
        results["heldout"] = {lang: heldout_perplexity(model, heldout_tokenizer, w, args.batch_tokens,
                                                       f"held-out {lang}") for lang, w in windows.items()}
    if members:
        results["tasks"] = {}
        for name in groups:  # one task (or group) at a time, so that progress is per task
            results["tasks"] |= scoring.evaluate_tasks(model, tokenizer, [name], args.data_dir, args.num_fewshot,
                                                       args.limit, args.batch_tokens, Progress(f"task {name}"))
    if benches:
        results["generation"] = {}
        try:
            answer_and_judge(args, model, tokenizer, benches, results)
        except KeyboardInterrupt:  # keep what was computed: perplexities, task scores, the judged benches
            results["interrupted"] = "during generation or judging; answers and judgments so far are kept beside"
            atomic_write_text(args.out, json.dumps(results, ensure_ascii=False, indent=2))
            print(f"interrupted: the results so far are in {args.out}; rerun the same command to continue",
                  file=sys.stderr, flush=True)
            raise
    results["elapsed_s"] = round(time.time() - start, 1)
    print(results_table(results), flush=True)  # first, so that a failed write loses nothing shown
    atomic_write_text(args.out, json.dumps(results, ensure_ascii=False, indent=2))
    print(f"\nwrote {args.out} ({results['elapsed_s']} s)")
    ungraded = [b for b, r in results.get("generation", {}).items() if r is not None and r["n_judged"] == 0]
    if ungraded:
        fail(f"the judge graded nothing for {', '.join(ungraded)}: every judgment failed (see "
             f"{results['generation'][ungraded[0]]['judgments']}); rerun the same command to judge again")

