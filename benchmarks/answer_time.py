"""Time to answer MT-Bench (both turns, greedy, with the chat template's stop tokens), one question at a time vs
--gen-batch questions at once, through `generate_answers`, the code `evaluate.py --generate` runs. The two answer
files must agree (batching does not change greedy answers). --questions N answers the first N questions only.

    python benchmarks/answer_time.py [--questions 80] [--max-new-tokens 512] [--gen-batch 16] [--threads 2]
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
from elo.evaluation.generate import QUESTION_FILES, generate_answers, read_records  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=elo.DEFAULT_MODEL)
    p.add_argument("--questions", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = elo.load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    tokenizer = elo.load_tokenizer(a.model)
    print(f"machine: {machine()}")
    print(f"model {a.model}, {a.dtype}, device {a.device}, MT-Bench first {a.questions} questions x 2 turns, "
          f"max {a.max_new_tokens} new tokens, greedy")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "eval"
        (data / "mt_bench").mkdir(parents=True)
        lines = (DATA / QUESTION_FILES["mt_bench"]).read_text(encoding="utf-8").splitlines()[:a.questions]
        (data / QUESTION_FILES["mt_bench"]).write_text("\n".join(lines) + "\n", encoding="utf-8")
        rows, answers = [], []
        for batch in (1, a.gen_batch):
            out = Path(tmp) / f"answers-{batch}.jsonl"
            start, cpu = time.perf_counter(), time.process_time()
            generate_answers(model, tokenizer, "mt_bench", data, out, a.max_new_tokens, batch_size=batch)
            rows.append((batch, time.perf_counter() - start, time.process_time() - cpu))
            answers.append([r["choices"][0]["turns"] for r in read_records(out)])
            print(json.dumps({"gen_batch": batch, "wall_s": round(rows[-1][1], 1), "cpu_s": round(rows[-1][2], 1)}),
                  flush=True)
    print("\n| gen-batch | wall s | CPU s | speed vs one at a time (wall) | (CPU time) |")
    print("|---|---|---|---|---|")
    for batch, wall, cpu in rows:
        print(f"| {batch} | {wall:.0f} | {cpu:.0f} | {rows[0][1] / wall:.2f}x | {rows[0][2] / cpu:.2f}x |")
    same = sum(x == y for x, y in zip(*answers))
    print(f"\nanswers identical: {same}/{len(answers[0])} questions")


if __name__ == "__main__":
    main()
