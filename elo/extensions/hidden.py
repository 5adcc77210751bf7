"""Hidden states around decoder layers, read with forward hooks during one forward pass that stops after the highest
layer asked for: the layers above it and the head never run."""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from elo.model import Transformer


class _Done(Exception):
    """Raised by the hook of the highest layer asked for: nothing above it is needed."""


def input_ids(batch) -> Tensor:
    """The token ids of a batch: a LongTensor (batch, seq), or an object holding one as `.inputs` (elo.data.text.Batch)."""
    ids = getattr(batch, "inputs", batch)
    if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.ndim != 2:
        what = f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"expected token id batches (LongTensor [batch, seq] or elo.data.text.Batch); got {what}")
    return ids


@torch.no_grad()
def layer_states(model: Transformer, batch, keys: Collection[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """{key: (input, output)} hidden states, each (batch, seq, hidden), of the decoder layers `keys` (keys of
    `model.model.layers`: original 0-based indices as strings) for one batch of token ids."""
    layers = model.model.layers
    unknown = sorted(set(keys) - set(layers), key=int)
    if not keys or unknown:
        raise ValueError(f"no decoder layers {unknown or '(none given)'} in this model; it has {list(layers)}")
    last = [k for k in layers if k in keys][-1]
    states: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(key: str):
        def read(module, args, output):
            states[key] = (args[0], output)
            if key == last:
                raise _Done
        return read

    handles = [layers[k].register_forward_hook(hook(k)) for k in keys]
    try:
        model(input_ids(batch).to(model.device))
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return states
