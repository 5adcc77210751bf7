"""SFT on the default model, small: does the held-out assistant-token loss fall, and what do the answers look like?

Runs `sft.py` (through elo.sft) on SmolLM2-135M-Instruct with Korean chatbot data and English instructions, 1:1,
then writes RESULTS.md beside this file: the held-out Korean / English assistant-token loss before and after (from
the run's metrics.jsonl), and the greedy answers, verbatim, of the model before and after to the first turns of 3
LogicKor and 3 MT-Bench questions.

    python studies/sft-smoke/run.py [--out runs/sft-smoke] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import elo  # noqa: E402
from elo.data.chat_templates import render_chat  # noqa: E402
from elo.tools.cli import parse_config  # noqa: E402
from elo.tools.files import atomic_write_text  # noqa: E402
from elo.evaluation.generate import chat_stop_ids, generate_batch, load_questions  # noqa: E402
from elo.sft import SFTConfig, sft  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def answers(model_dir: str, questions: list[dict], max_new_tokens: int) -> list[str]:
    model, tok = elo.load_model(model_dir), elo.load_tokenizer(model_dir)
    prompts = [tok.encode(render_chat(tok, [{"role": "user", "content": q["turns"][0]}])) for q in questions]
    out = generate_batch(model, prompts, max_new_tokens, chat_stop_ids(model, tok))
    return [tok.decode(ids) for ids in out]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(REPO / "runs" / "sft-smoke"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=160)
    a = p.parse_args()
    argv = ["--model", elo.DEFAULT_MODEL, "--data", f"ko={DATA / 'sft' / 'ko_chatbot_data.jsonl'}",
            "--data", f"en={DATA / 'sft' / 'en_self_instruct_seed_tasks.jsonl'}", "--seq-len", "512",
            "--batch-size", "8", "--max-steps", str(a.steps), "--lr", "5e-5", "--warmup-steps", "4",
            "--val-conversations", "64", "--eval-batches", "8", "--out", a.out]
    cfg = parse_config(SFTConfig, argv, "")
    model_dir = sft(cfg)
    records = [json.loads(line) for line in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    questions = (load_questions("logickor", DATA / "eval")[:3]) + (load_questions("mt_bench", DATA / "eval")[:3])
    before = answers(elo.DEFAULT_MODEL, questions, a.max_new_tokens)
    after = answers(str(model_dir), questions, a.max_new_tokens)
    lines = ["# SFT on the default model: held-out loss and greedy answers before / after", "",
             f"Command: `python studies/sft-smoke/run.py --steps {a.steps}` — `sft.py "
             + " ".join(argv).replace(str(DATA), "../shared/data") + "`", "",
             "Held-out assistant-token loss (64 held-out conversations per language, the loss on assistant tokens "
             "only):", "", "| language | before (step 0) | after (step %d) |" % last["step"], "|---|---|---|"]
    for lang in ("ko", "en"):
        lines.append(f"| {lang} | {first[f'val_loss/{lang}']:.4f} | {last[f'val_loss/{lang}']:.4f} |")
    lines += ["", f"Greedy answers, first turns, at most {a.max_new_tokens} new tokens, verbatim (a 135M model: "
              "judge them as such).", ""]
    for q, b, c in zip(questions, before, after):
        bench = "MT-Bench" if q in questions[3:] else "LogicKor"
        lines += [f"## {bench} {q['question_id']} ({q['category']})", "", "**Question:** " + q["turns"][0], "",
                  "**Before:**", "", "```", b, "```", "", "**After:**", "", "```", c, "```", ""]
    atomic_write_text(Path(__file__).parent / "RESULTS.md", "\n".join(lines))
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
