"""The whole method in one command: `python pipeline.py recipes/quickstart.toml [--out DIR] [--from STAGE] [--dry-run]`.

Runs a recipe's stages (ELO -> align -> chat vector -> SFT -> evaluate, plus the full fine-tuning and LoRA
baselines) through the same entry points as train.py, align.py, sft.py and evaluate.py, skipping finished stages and
resuming interrupted ones, then writes report.md / report.json into the run directory. See elo/pipeline.py.
"""
try:  # Ctrl-C while torch loads is a quiet exit, as it is during a run
    from elo.tools.cli import run_main
    from elo.pipeline.run import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

if __name__ == "__main__":
    run_main(main)
