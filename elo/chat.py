"""Talk to a model through its chat template: `python -m elo.chat --model M` (/reset, /system TEXT, /exit), or
`--prompt TEXT` to answer once. Greedy unless --temperature says otherwise; answers stream to stdout."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from elo.data.chat_templates import Message, chat_renderer, render_chat
from elo.evaluation.generate import chat_stop_ids, stream
from elo.hf.checkpoint import load_model
from elo.hf.hub import resolve
from elo.hf.default_model import DEFAULT_MODEL
from elo.hf.tokenizer import load_tokenizer
from elo.tools.cli import run_main

COMMANDS = "/reset starts a new conversation, /system TEXT starts one with this system message, /exit quits"


def _say(model: Any, tokenizer: Any, messages: list[Message], stop: set[int], args: Any) -> str:
    """The assistant's answer to `messages`, printed as it is decoded; returned stripped, as FastChat keeps it."""
    prompt = tokenizer.encode(render_chat(tokenizer, messages))
    special = set(tokenizer.special_tokens.values())
    tokens: list[int] = []
    shown = ""
    for _, token in stream(model, [prompt], args.max_new_tokens, stop, args.temperature, args.top_p):
        if token in special:
            continue
        tokens.append(token)
        text = tokenizer.decode(tokens).lstrip()
        # a character of several bytes may span tokens: print it once it is whole
        if not text.endswith("\ufffd") and text.startswith(shown):
            print(text[len(shown):], end="", flush=True)
            shown = text
    text = tokenizer.decode(tokens).lstrip()
    print(text[len(shown):] if text.startswith(shown) else "", flush=True)
    return text.strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m elo.chat", description="Talk with a model through its chat template, "
                                f"greedy unless --temperature says otherwise; answers go to stdout. {COMMANDS}.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF model directory, hub id or the default model")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this mass")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    if not (args.temperature >= 0 and 0 < args.top_p <= 1) or args.max_new_tokens < 1:  # NaN fails both
        raise ValueError(f"need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1; got "
                         f"{args.temperature}, {args.top_p} and {args.max_new_tokens}")
    directory = resolve(args.model)
    tokenizer = load_tokenizer(directory)
    if not tokenizer.chat_template:
        raise ValueError(f"model {args.model} has no chat template; expected an instruct (chat) model")
    chat_renderer(tokenizer.chat_template)  # an unsupported template is refused before the weights load
    model = load_model(directory, dtype=getattr(torch, args.dtype), device=args.device)
    if model.config.elo is not None:
        print(f"note: {args.model} is an ELO submodel ({len(model.config.layer_ids)} of "
              f"{model.config.elo['base_num_hidden_layers']} layers of {model.config.elo['base']}), not a whole model; "
              f"splice it into its base first (align.py, or elo.splice_checkpoint)", file=sys.stderr, flush=True)
    stop = chat_stop_ids(model, tokenizer)

    if args.prompt is not None:
        _say(model, tokenizer, [{"role": "user", "content": args.prompt}], stop, args)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{args.model}: {COMMANDS}.", file=sys.stderr)
    messages: list[Message] = []
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        command, _, text = line.partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            messages = []
        elif command == "/system" and not text.strip():
            print("usage: /system TEXT", file=sys.stderr)
        elif command == "/system":
            system = [{"role": "system", "content": text.strip()}]
            try:  # Mistral v0.1/v0.2 have no system role: say so now, not at the next message
                render_chat(tokenizer, [*system, {"role": "user", "content": "?"}])
                messages = system
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
        elif command.startswith("/"):
            print(f"unknown command {command}; {COMMANDS}", file=sys.stderr)
        else:
            messages.append({"role": "user", "content": line})
            try:
                messages.append({"role": "assistant", "content": _say(model, tokenizer, messages, stop, args)})
            except KeyboardInterrupt:  # Ctrl-C stops this answer; the conversation goes on without the question
                if not interactive:
                    raise
                messages.pop()
                print("\n(interrupted)", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
