"""The read-answer loop of infer/chat.py: commands, Ctrl-C (stops the answer, not the program), end of input."""
from __future__ import annotations

import sys

from infer.decode import compile_decode, wants_compile
from infer.runtime import load_for_inference, set_threads
from infer.sampling import SamplingParams
from infer.session import ChatSession, CompletionSession
from kernels.common import FurnaceError

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops the current answer"


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_session(args):
    if args.max_new_tokens < 1:
        raise FurnaceError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    set_threads(args.threads)
    model, tok, _ = load_for_inference(args.ckpt, args.device, args.dtype, args.tokenizer)
    if wants_compile(args.compile, model):
        compile_decode(model)
    kw = dict(sampling=sampling, max_new_tokens=args.max_new_tokens, seed=args.seed, write=_out, notice=_note)
    if args.complete:
        return CompletionSession(model, tok, **kw)
    return ChatSession(model, tok, system=args.system, **kw)


def _answer(session, text: str) -> None:
    if isinstance(session, CompletionSession):
        _, interrupted = session.complete(text)
    else:
        _, interrupted = session.respond(text)
    _out("\n")
    if interrupted:
        _note("[stopped]")


def _read(interactive: bool) -> str | None:
    """One line of input, None at end of input. Ctrl-C at the prompt gives a fresh prompt."""
    while True:
        try:
            if interactive:
                return input("> ")
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            _out("\n")


def run_chat(args) -> int:
    session = make_session(args)
    if args.prompt is not None:
        _answer(session, args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        _note(HELP)
    while True:
        line = _read(interactive)
        if line is None:
            if interactive:
                _out("\n")
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            if isinstance(session, ChatSession):
                session.reset()
            _note("[conversation reset]")
            continue
        if cmd.startswith("/") and " " not in cmd:
            _note(f"[unknown command {cmd}; {HELP}]")
            continue
        if interactive and isinstance(session, ChatSession):
            _out("assistant: ")
        _answer(session, line)
