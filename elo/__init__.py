"""elo: Efficient Layer-Specific Optimization (arXiv 2601.03648) for language adaptation of LLMs, in pure PyTorch.

Reading path: config -> model -> surgery -> pretrain -> train/loop -> align -> chat_vector -> sft (README)."""
from elo.chat_vector import add_chat_vector
from elo.config import ModelConfig
from elo.extensions.distill import distill_middle
from elo.extensions.fidelity import gradient_fidelity
from elo.extensions.layer_scores import LayerScores, layer_scores
from elo.extensions.middle import fit_middle
from elo.hf.checkpoint import load_middle, load_model, save_middle, save_model
from elo.hf.hub import resolve
from elo.hf.default_model import DEFAULT_MODEL
from elo.hf.tokenizer import load_tokenizer
from elo.model import MiddleSurrogate, Transformer, attach_middle
from elo.pipeline.resources import plan
from elo.surgery import detach, detach_checkpoint, load_detached, splice, splice_checkpoint

__all__ = ["DEFAULT_MODEL", "ModelConfig", "Transformer", "load_model", "save_model", "load_tokenizer", "resolve",
           "detach", "load_detached", "splice", "detach_checkpoint", "splice_checkpoint", "add_chat_vector", "fit_middle",
           "distill_middle", "MiddleSurrogate", "attach_middle", "save_middle", "load_middle", "layer_scores",
           "LayerScores", "gradient_fidelity", "plan"]
