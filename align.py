"""ELO stage 2: `torchrun --nproc_per_node N align.py --elo runs/elo-ko --data ko=ko.jsonl --data en=en.jsonl --out runs/align-ko`.

Splices the trained ELO layers into the base while loading and fine-tunes the whole model briefly (by default on
1/9 of the ELO run's tokens, continuing its data stream). See `python align.py --help`.
"""
try:  # Ctrl-C while torch loads is a quiet exit, as it is during a run
    from elo.align import main
    from elo.tools.cli import run_main
except KeyboardInterrupt:
    raise SystemExit(130) from None

if __name__ == "__main__":
    run_main(main)
