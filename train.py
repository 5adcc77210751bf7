"""ELO pretraining: `torchrun --nproc_per_node N train.py --layers 1,32 --data ko=ko.jsonl --data en=en.jsonl --out runs/elo`.

`--layers all` is full fine-tuning and `--lora-rank R` LoRA, the baselines, in the same loop. Plain `python train.py`
runs one process. See `python train.py --help`.
"""
try:  # Ctrl-C while torch loads is a quiet exit, as it is during a run
    from elo.tools.cli import run_main
    from elo.pretrain import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

if __name__ == "__main__":
    run_main(main)
