"""Chat vector (Huang et al. 2024): give a continually pretrained model the instruction following of an instruct
model by adding the difference between that instruct model and its pretrained base, tensor by tensor.

    out = model + ratio * (instruct - base)

computed in fp32 and stored in the model's dtype, streamed: the model is rewritten one tensor at a time, each
combined with the same-named tensor of base and instruct, so memory holds one tensor of each source and one output
shard, never a whole model (a 70B trio would be 420 GB in bf16).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from torch import Tensor

from elo.hf.checkpoint import CheckpointReader, copy_side_files, load_config, rewrite_checkpoint
from elo.hf.hub import resolve
from elo.tools.files import atomic_dir

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")  # rows indexed by token id
POLICIES = ("add", "skip")
CHUNK = 1 << 22  # elements combined at a time (16 MB per fp32 temporary)


def _tensor_names(reader: CheckpointReader) -> set[str]:
    # a tied head is the embedding: count it once even if a checkpoint stores both
    tied = load_config(reader.directory).tie_word_embeddings
    return {n for n in reader.keys() if not (tied and n == "lm_head.weight") and "rotary_emb" not in n}


def _check(model: CheckpointReader, base: CheckpointReader, instruct: CheckpointReader) -> dict[str, int]:
    """Refuse trios whose tensors differ in name or shape; return the rows the three share, for embedding tensors
    whose vocabularies differ."""
    names = _tensor_names(model)
    for other, role in ((base, "base"), (instruct, "instruct")):
        theirs = _tensor_names(other)
        for name in sorted(names ^ theirs):
            where, lacks = ("the model", role) if name in names else (role, "the model")
            raise ValueError(f"tensor {name!r} is in {where} but not in {lacks} ({other.directory}); "
                             f"a chat vector needs the same architecture for model, base and instruct")
    shared_rows = {}
    for name in sorted(names):
        shapes = {role: r.shape(name) for role, r in (("model", model), ("base", base), ("instruct", instruct))}
        if len(set(shapes.values())) == 1:
            continue
        if name in EMBEDDINGS and len({s[1:] for s in shapes.values()}) == 1:
            shared_rows[name] = min(s[0] for s in shapes.values())
            continue
        raise ValueError(f"tensor {name!r} has shapes {shapes}; a chat vector needs equal shapes "
                         f"(only embedding and head rows may differ, when vocabularies do)")
    return shared_rows


def _plus_scaled_difference(t: Tensor, base: Tensor, instruct: Tensor, ratio: float) -> Tensor:
    """t + ratio * (instruct - base) on t's leading len(base) rows (all of them when shapes agree), in fp32, a chunk
    at a time: whole-tensor fp32 temporaries of a 70B model's embedding would be several GB each."""
    out = t.clone()  # our own memory: t may be a view of the memory-mapped file, where writes would stay resident
    o, base, instruct = out[:len(base)].view(-1), base.reshape(-1), instruct.reshape(-1)
    for s in range(0, len(o), CHUNK):
        chunk = slice(s, s + CHUNK)
        o[chunk] = (o[chunk].float() + ratio * (instruct[chunk].float() - base[chunk].float())).to(o.dtype)
    return out


def add_chat_vector(model: str | os.PathLike, base: str | os.PathLike, instruct: str | os.PathLike,
                    out: str | os.PathLike, ratio: float = 1.0, embeddings: str = "add") -> Path:
    """Write `model + ratio * (instruct - base)` to `out` as an HF model, streamed tensor by tensor.

    Each source is a local directory, a hub id or the default model's name. Names and shapes must agree, except the
    rows of the embedding and head when vocabularies differ: `embeddings="add"` adds the vector on the rows all
    three share and keeps the model's other rows, `"skip"` keeps the model's embedding and head as they are.
    The output has the model's config and shard layout, and the instruct model's tokenizer files, chat template
    and generation config (a pretrained model usually has no chat template)."""
    if embeddings not in POLICIES:
        raise ValueError(f"embeddings={embeddings!r}; expected one of {POLICIES}")
    if not math.isfinite(ratio):
        raise ValueError(f"ratio={ratio}; expected a finite number")
    model_dir, base_dir, instruct_dir = resolve(model), resolve(base), resolve(instruct)
    readers = [CheckpointReader(d) for d in (model_dir, base_dir, instruct_dir)]
    model_r, base_r, instruct_r = readers
    shared_rows = _check(*readers)
    keep = _tensor_names(model_r)

    def merge(name: str, t: Tensor) -> Tensor | None:
        if name not in keep:
            return None  # the stored copy of a tied head
        rows = shared_rows.get(name)
        if rows is None:
            return _plus_scaled_difference(t, base_r.get(name), instruct_r.get(name), ratio)
        if embeddings == "add":
            return _plus_scaled_difference(t, base_r.get_rows(name, rows), instruct_r.get_rows(name, rows), ratio)
        return t

    def fill(tmp: Path) -> None:
        rewrite_checkpoint(model_r, tmp, merge)
        (tmp / "config.json").write_bytes((model_dir / "config.json").read_bytes())
        copy_side_files(instruct_dir, tmp)

    return atomic_dir(out, fill, "chat vector output")
