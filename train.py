"""ELO pretraining: `torchrun --nproc_per_node N train.py --layers 1,32 --data ko=ko.jsonl --data en=en.jsonl --out runs/elo`.

`--layers all` is full fine-tuning and `--lora-rank R` LoRA, the baselines, in the same loop. Plain `python train.py`
runs one process. See `python train.py --help`.
"""
from elo.trainer import config_from_args, train

if __name__ == "__main__":
    train(config_from_args())
