"""elo: Efficient Layer-Specific Optimization (arXiv 2601.03648) for language adaptation of LLMs, in pure PyTorch."""
from elo.chat_vector import add_chat_vector
from elo.hf.checkpoint import load_model, resolve, save_model
from elo.config import ModelConfig
from elo.extensions.layer_scores import LayerScores, layer_scores
from elo.extensions.middle import MiddleSurrogate, attach_middle, fit_middle, load_middle, save_middle
from elo.model import Transformer
from elo.surgery import detach, detach_checkpoint, load_detached, splice, splice_checkpoint

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The model's tokenizer (see elo.hf.tokenizer)."""
    from elo.hf.tokenizer import load_tokenizer as _load

    return _load(name_or_path)


__all__ = ["DEFAULT_MODEL", "ModelConfig", "Transformer", "load_model", "save_model", "load_tokenizer", "resolve",
           "detach", "load_detached", "splice", "detach_checkpoint", "splice_checkpoint", "add_chat_vector", "fit_middle", "MiddleSurrogate",
           "attach_middle", "save_middle", "load_middle", "layer_scores", "LayerScores"]
