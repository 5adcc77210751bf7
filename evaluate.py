"""Evaluate a model: per-language perplexity, lm-evaluation-harness-identical benchmarks, MT-Bench-style generation
graded by an LLM judge, or compare result files. See `python evaluate.py --help` and elo/evaluation/evaluate.py."""
try:  # Ctrl-C while torch loads is a quiet exit, as it is during a run
    from elo.evaluation.evaluate import main
    from elo.tools.cli import run_main
except KeyboardInterrupt:
    raise SystemExit(130) from None

if __name__ == "__main__":
    run_main(main)
