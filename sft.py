"""ELO stage 3: `torchrun --nproc_per_node N sft.py --model runs/align-ko/model --data ko=ko_chats.jsonl --data en=en_chats.jsonl --epochs 1 --out runs/sft-ko`.

Optionally adds a chat vector first (--chat-vector-base B --chat-vector-instruct I), then fine-tunes on chat data with
the loss on assistant turns only. See `python sft.py --help`.
"""
try:  # Ctrl-C while torch loads is a quiet exit, as it is during a run
    from elo.tools.cli import run_main
    from elo.sft import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

if __name__ == "__main__":
    run_main(main)
