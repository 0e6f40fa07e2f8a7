"""`rung generate` (stream one completion) and `rung chat` (an interactive conversation)."""

from __future__ import annotations

import argparse
import sys
import time

from rung.commands.base import Command
from rung.commands.index import open_rag, rag_arguments

DEFAULT_MODEL = "smollm2-135m"


def _model_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"built-in name, .gguf file or Hugging Face folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _params(args: argparse.Namespace):
    from rung.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
                          stop=args.stop)


def _load(args: argparse.Namespace):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rung.llm import LLM

    start = time.perf_counter()
    columns = (TextColumn(f"loading {args.model}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("load", total=None)
        llm = LLM(args.model, dtype=args.dtype, device=args.device,
                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(f"loaded {args.model} ({llm.config.model_type}, {args.dtype}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return llm


def _stream_out(deltas) -> tuple[str, int, float, float]:
    """Print deltas as they come; return the text, tokens, time to first token and total time."""
    start, first, tokens, text = time.perf_counter(), 0.0, 0, []
    for d in deltas:
        if d.token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(d.token_ids)
        text.append(d.text)
        sys.stdout.write(d.text)
        sys.stdout.flush()
    return "".join(text), tokens, first, time.perf_counter() - start


def _report(tokens: int, first: float, total: float) -> None:
    rate = (tokens - 1) / (total - first) if tokens > 1 and total > first else 0.0
    print(f"\n[{tokens} tokens, first after {first * 1000:.0f} ms, {rate:.1f} tokens/s]", file=sys.stderr)


# ---- rung generate ------------------------------------------------------------------------------


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _model_arguments(p, max_tokens=128)


def _generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    if args.chat:
        deltas = llm.chat_stream([{"role": "user", "content": args.prompt}], _params(args))
    else:
        deltas = llm.stream(args.prompt, _params(args))
    _, tokens, first, total = _stream_out(deltas)
    _report(tokens, first, total)
    return 0


GENERATE = Command("generate", "stream a completion of a prompt", _generate_arguments, _generate)


# ---- rung chat ----------------------------------------------------------------------------------

CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--once", metavar="MESSAGE", default=None, help="send one message, print the answer, exit")
    _model_arguments(p, max_tokens=512)
    rag_arguments(p)  # sources follow each answer, marked where the answer cites or uses them


def _chat(args: argparse.Namespace) -> int:
    index = open_rag(args)
    llm = _load(args)
    params = _params(args)
    system = args.system
    history: list[dict] = []

    def answer(message: str) -> None:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": message})
        grounding = None
        if index is not None:  # each message retrieves anew; the history keeps the messages as typed
            from rung.rag import ground

            messages, grounding = ground(index, messages, args.rag_k, args.rag_max_chars)
        text, tokens, first, total = _stream_out(llm.chat_stream(messages, params))
        if grounding is not None:
            from rung.rag import check_answer, format_sources

            print("\n\nsources:" if grounding.hits else "\n\nsources: (no passage matches the message)")
            if grounding.hits:
                print(format_sources(grounding, check_answer(text, grounding)), flush=True)
        _report(tokens, first, total)
        history.extend([{"role": "user", "content": message}, {"role": "assistant", "content": text}])

    if args.once is not None:
        answer(args.once)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
        elif line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)", file=sys.stderr)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
        else:
            answer(line)


CHAT = Command("chat", "chat with a model (history, /reset, /system, /exit)", _chat_arguments, _chat)
