"""A first, small check of the question behind issues 12 and 14: how much does splicing the ELO-trained layers
back into the base hurt before any alignment, and does the ELO learning rate or the fitted middle-layer surrogate
(`train.py --middle linear`) change that?

Four ELO (1,30) runs on the default model, Korean + English 9:1, the same 100k tokens: lr 2e-4 and 2e-5, each
with and without the surrogate. For each, `align.py --max-steps 1` logs, before its one step, the held-out loss of
the base and of the spliced model on the same tokens (the ELO run's held-out split). Writes SPLICE_CHECK.md.

    python studies/smollm2-ko/splice_check.py [--runs runs/splice-check]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from elo.align import AlignConfig, align  # noqa: E402
from elo.tools.cli import parse_config  # noqa: E402
from elo.tools.files import atomic_write_text  # noqa: E402
from elo.pretrain import config_from_args, train  # noqa: E402

D = REPO.parent / "shared" / "data" / "pretrain"
DATA = ["--data", f"ko={D / 'ko_wikipedia.jsonl'}", "--data", f"en={D / 'en_wikipedia.jsonl'}"]
COMMON = ["--seq-len", "512", "--batch-size", "4", "--eval-batches", "4"]
ARMS = [("2e-4", None), ("2e-4", "linear"), ("2e-5", None), ("2e-5", "linear")]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "splice-check")
    p.add_argument("--steps", type=int, default=49, help="ELO steps of 4 x 512 tokens (49: ~100k tokens)")
    a = p.parse_args()
    rows = []
    for lr, middle in ARMS:
        name = f"lr{lr}" + ("-middle" if middle else "")
        elo_out, align_out = a.runs / f"elo-{name}", a.runs / f"align-{name}"
        extra = ["--middle", middle, "--middle-tokens", "12000"] if middle else []
        train(config_from_args([*DATA, *COMMON, "--layers", "1,30", "--max-steps", str(a.steps), "--lr", lr,
                                "--warmup-steps", "5", "--out", str(elo_out), "--resume", *extra]))
        align(parse_config(AlignConfig, [*DATA, *COMMON, "--elo", str(elo_out), "--max-steps", "1",
                                         "--out", str(align_out), "--resume"], ""))
        elo_last, step0 = records(elo_out)[-1], records(align_out)[0]
        rows.append((name, elo_last, step0))
    base = rows[0][2]
    lines = ["# Splice check: the spliced ELO model before any alignment", "",
             f"`python studies/smollm2-ko/splice_check.py` — SmolLM2-135M-Instruct, ELO layers 1 and 30, "
             f"{a.steps} steps × 4 × 512 = {a.steps * 2048:,} tokens (ko:en 9:1), warmup 5, cosine to 0.1·lr; "
             "held-out loss per token on the ELO run's held-out split (first 16 sequences of 512 per language), "
             "the same tokens in every row. 'spliced' is the base with the two trained layers put back, before any "
             "alignment (align.py's step-0 record).", "",
             "| model | ELO lr | surrogate | ko | en | submodel alone ko / en |", "|---|---|---|---|---|---|",
             f"| base | - | - | {base['base_val_loss/ko']:.4f} | {base['base_val_loss/en']:.4f} | - |"]
    for name, elo_last, step0 in rows:
        lr, middle = name.removeprefix("lr").split("-middle")[0], "linear" if name.endswith("-middle") else "none"
        lines.append(f"| spliced | {lr} | {middle} | {step0['val_loss/ko']:.4f} | {step0['val_loss/en']:.4f} | "
                     f"{elo_last['val_loss/ko']:.4f} / {elo_last['val_loss/en']:.4f} |")
    atomic_write_text(Path(__file__).parent / "SPLICE_CHECK.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
