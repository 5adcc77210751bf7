"""Evaluate a model: per-language perplexity, lm-evaluation-harness-identical benchmarks, MT-Bench-style generation
graded by an LLM judge, or compare result files. See `python evaluate.py --help` and elo/evaluation/evaluate.py."""
from elo.evaluation.evaluate import main
from elo.tools.cli import run_main

if __name__ == "__main__":
    run_main(main)
