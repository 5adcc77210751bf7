"""Evaluation: lm-eval-identical tasks and their scoring, KV-cache generation, benchmark answer files, the LLM
judge, and results tables."""
