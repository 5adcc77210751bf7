"""Log-likelihoods from an elo model, computed the way lm-evaluation-harness's HFLM computes them.

- `encode_pair`: lm-eval's `_encode_pair` (trailing whitespace of the context moves to the continuation; the whole
  string is encoded, then split at the length of the encoded context; the tokenizer's default special tokens, as
  `tokenizer.encode(s)` with `add_special_tokens` left alone in transformers).
- `loglikelihoods`: each request's model input is `(context + continuation)[-(max_length + 1):][:-1]`; requests are
  sorted longest first, batched up to a token budget, padded on the right (harmless under causal attention), one
  forward per batch; requests with the same input share one row; the choices of one question share their context's
  forward through the KV cache when it is long enough to pay. Log-softmax is taken only at the scored positions.
- `perplexity`: lm-eval's `loglikelihood_rolling`: each document is scored on its own in disjoint windows of
  `seq_len` predicted tokens (get_rolling_token_windows + make_disjoint_window with context_len=1), the first token
  conditioned on the BOS token (EOS where there is none); windows of all documents are batched together.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from elo.evaluation import tasks as task_defs
from elo.model import Transformer
from elo.hf.tokenizer import Tokenizer

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)
Progress = Callable[[int, int], None]  # called with (requests done, total) after each batch
HEAD_ROWS = 512  # positions pushed through the output head at once: bounds the logits' memory
# Sharing a prefix costs one extra forward call per group, which on a CPU costs about as much as ~50 tokens
# (every call reads all the weights); share only when that saves more than twice as much.
SHARE_MIN_TOKENS = 128
MIN_FILL = 0.9  # shortest sequence of a batch relative to its longest: padding is computed like real tokens


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token a document's first token is conditioned on: BOS, else EOS (lm-eval's prefix_token_id)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` with the special tokens the tokenizer's config adds by default (BOS for Llama 2, none for Qwen2 or
    SmolLM2): HF's `encode(text)`, which is what HFLM's tok_encode calls."""
    return tokenizer.encode(text, add_bos=True, add_eos=True)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's TemplateLM.loglikelihood tokenization of one (context, continuation) pair."""
    if context == "":
        cont = tokenizer.encode(continuation)
        prefix = prefix_token(tokenizer)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: list[int], prefix: int, seq_len: int) -> list[Request]:
    """Disjoint (context, predicted) windows covering `tokens`: lm-eval's get_rolling_token_windows followed by
    make_disjoint_window, with context_len=1. The first window predicts up to `seq_len` tokens after `prefix`; each
    later one predicts the next `seq_len` tokens after one token of context, except the last, which takes as much
    context as fits in `seq_len` inputs."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not tokens:
        return []
    first = min(seq_len, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = done + min(len(tokens) - done, seq_len)
        windows.append((tokens[end - seq_len - 1:done], tokens[done:end]))
        done = end
    return windows


@torch.no_grad()
def loglikelihoods(model: Transformer, requests: Sequence[Request], batch_tokens: int = 8192,
                   max_length: int | None = None, progress: Progress | None = None) -> list[float]:
    """Sum of log p(continuation | context) for each (context tokens, continuation tokens) request.

    `max_length` (default: the model's max_position_embeddings) is the longest input; longer requests lose tokens
    on the left as in lm-eval. A batch holds as many sequences as fit in `batch_tokens` padded tokens (at least one).
    Requests that share everything up to their first scored position (the choices of one multiple-choice question)
    run that prefix once when it saves at least SHARE_MIN_TOKENS tokens; the rest run whole. `progress(done, total)`
    is called after each batch.
    """
    max_length = max_length or model.config.max_position_embeddings
    inputs = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i} has an empty context or continuation ({len(ctx)} and {len(cont)} tokens)")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}")
        inputs.append((ctx + cont)[-(max_length + 1):][:-1])
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, inp in enumerate(inputs):
        by_prefix.setdefault(tuple(inp[:len(inp) - len(requests[i][1]) + 1]), []).append(i)
    shared = {p: ids for p, ids in by_prefix.items() if (len(ids) - 1) * len(p) >= SHARE_MIN_TOKENS}
    whole = [i for p, ids in by_prefix.items() if p not in shared for i in ids]
    out = [0.0] * len(requests)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(requests))

    # hidden states only: the head runs on the scored positions alone, never on (batch, seq, vocab) logits
    _score_whole(model, requests, inputs, whole, batch_tokens, out, advance)
    _score_shared(model, requests, shared, batch_tokens, out, advance)
    return out


def _batches(seqs: list[tuple[int, ...]], batch_tokens: int) -> Iterator[list[tuple[int, ...]]]:
    """Consecutive slices of `seqs` (longest first), at least one sequence each, padding to at most `batch_tokens`
    tokens; a slice also ends before a sequence shorter than MIN_FILL of its first, so padding stays under 10%."""
    start = 0
    while start < len(seqs):
        width, end = len(seqs[start]), start + 1
        while end < len(seqs) and (end - start + 1) * width <= batch_tokens and len(seqs[end]) >= MIN_FILL * width:
            end += 1
        yield seqs[start:end]
        start = end


def _padded(seqs: Sequence[Sequence[int]], width: int, device: torch.device) -> Tensor:
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # right padding: causal attention never looks at it
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids.to(device)


def _score_whole(model: Transformer, requests: Sequence[Request], inputs: list[list[int]],
                 indices: list[int], batch_tokens: int, out: list[float], advance: Callable[[int], None]) -> None:
    """One row per distinct input: MMLU's A/B/C/D continuations, one token each, share theirs."""
    by_input: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        by_input.setdefault(tuple(inputs[i]), []).append(i)
    device = model.device
    for batch in _batches(sorted(by_input, key=len, reverse=True), batch_tokens):
        hidden = model.hidden_states(_padded(batch, len(batch[0]), device))
        scored = [(i, hidden[row, len(inp) - len(requests[i][1]):len(inp)])
                  for row, inp in enumerate(batch) for i in by_input[inp]]
        _add_logprobs(model.lm_head, requests, scored, out)
        advance(len(scored))


def _score_shared(model: Transformer, requests: Sequence[Request],
                  shared: dict[tuple[int, ...], list[int]], batch_tokens: int, out: list[float],
                  advance: Callable[[int], None]) -> None:
    """Each prefix runs once (batched, filling a KV cache); its last position scores every member's first
    continuation token; then the members' continuations run together, `batch_tokens` at a time, each chunk on its
    own copy of the prefix's keys and values."""
    device = model.device
    for batch in _batches(sorted(shared, key=len, reverse=True), batch_tokens):
        cache = model.new_cache(len(batch), len(batch[0]))
        hidden = model.hidden_states(_padded(batch, len(batch[0]), device), cache=cache)
        scored = []
        for row, prefix in enumerate(batch):
            n = len(prefix)
            last = hidden[row, n - 1:n]
            members = sorted(shared[prefix], key=lambda i: len(requests[i][1]), reverse=True)
            tails = {i: requests[i][1][:-1] for i in members}
            scored += [(i, last) for i in members if not tails[i]]
            members = [i for i in members if tails[i]]
            while members:
                width = len(tails[members[0]])
                size = max(1, batch_tokens // (n + width))
                chunk, members = members[:size], members[size:]
                sub = model.new_cache(len(chunk), n + width)
                for layer in range(len(sub.k)):
                    sub.k[layer][:, :, :n] = cache.k[layer][row:row + 1, :, :n]
                    sub.v[layer][:, :, :n] = cache.v[layer][row:row + 1, :, :n]
                sub.lengths = [n] * len(chunk)
                rest = model.hidden_states(_padded([tails[i] for i in chunk], width, device), cache=sub)
                scored += [(i, torch.cat([last, rest[j, :len(tails[i])]])) for j, i in enumerate(chunk)]
        _add_logprobs(model.lm_head, requests, scored, out)
        advance(len(scored))


def _add_logprobs(head: nn.Module, requests: Sequence[Request], scored: list[tuple[int, Tensor]],
                  out: list[float]) -> None:
    """out[i] = sum of log p(continuation token) over request i's scored hidden states, all requests in one pass."""
    hidden = torch.cat([h for _, h in scored])
    targets = torch.tensor([t for i, _ in scored for t in requests[i][1]], device=hidden.device)
    logprobs = []
    for h, t in zip(hidden.split(HEAD_ROWS), targets.split(HEAD_ROWS)):
        logits = head(h).float()
        logprobs.append(logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(-1))
    owner = torch.repeat_interleave(torch.tensor([h.shape[0] for _, h in scored], device=hidden.device))
    sums = torch.zeros(len(scored), dtype=torch.float64, device=hidden.device)
    sums.index_add_(0, owner, torch.cat(logprobs).double())
    for (i, _), total in zip(scored, sums.tolist()):
        out[i] = total


def perplexity(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], seq_len: int,
               batch_tokens: int = 8192, progress: Progress | None = None) -> dict[str, float]:
    """Mean NLL per token, perplexity and bits per byte (total NLL in nats / ln 2 / UTF-8 bytes) over `texts`."""
    prefix = prefix_token(tokenizer)
    windows: list[Request] = []
    for text in texts:
        windows += rolling_windows(encode(tokenizer, text), prefix, seq_len)
    if not windows:
        raise ValueError("no tokens to score: every document is empty")
    nll = -sum(loglikelihoods(model, windows, batch_tokens, max_length=seq_len, progress=progress))
    n_tokens = sum(len(cont) for _, cont in windows)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "docs": len(texts),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "nll_per_token": nll / n_tokens,
        "perplexity": math.exp(nll / n_tokens),
        "bits_per_byte": nll / math.log(2) / n_bytes,
    }


def evaluate_tasks(model: Transformer, tokenizer: Tokenizer, names: list[str], data_dir: str | Path | None,
                   num_fewshot: int | None = None, limit: int | None = None,
                   batch_tokens: int = 8192, progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """Metrics of each named task or group (and of a group's member tasks), read from `data_dir` (None: the Hub);
    requests of all tasks are scored in one sorted, batched pass."""
    groups = task_defs.expand(names)
    members = list(dict.fromkeys(t for ts in groups.values() for t in ts))
    instances = {t: task_defs.build_instances(task_defs.TASKS[t], data_dir, num_fewshot, limit) for t in members}
    requests = [encode_pair(tokenizer, inst.context, cont)
                for t in members for inst in instances[t] for cont in inst.continuations]
    lls = iter(loglikelihoods(model, requests, batch_tokens, progress=progress))
    results = {}
    for t in members:
        per_doc = [[next(lls) for _ in inst.choices] for inst in instances[t]]
        results[t] = task_defs.compute_metrics(task_defs.TASKS[t], instances[t], per_doc)
    for name, ts in groups.items():
        if name not in results:
            results[name] = task_defs.aggregate([results[t] for t in ts])
    return results
