"""Terminal chat (and plain completion) with a Furnace checkpoint, CPU by default.

    python infer/chat.py --ckpt runs/sft                      # interactive; /reset, /exit, Ctrl-D
    python infer/chat.py --ckpt runs/sft --prompt "Hi"        # answer once and exit
    python infer/chat.py --ckpt runs/base --complete --prompt "def fib(n):"
    python infer/chat.py --ckpt runs/sft --compile off        # start at once, decode in eager mode
The read-answer loop: /reset, /exit (or Ctrl-D); Ctrl-C stops the current answer, not the program.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops the current answer"


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_session(args):
    from infer.decode import Decoder, wants_compile
    from infer.runtime import load_for_inference, set_threads
    from infer.sampling import SamplingParams
    from infer.session import ChatSession, CompletionSession
    if args.max_new_tokens < 1:
        raise FurnaceError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    set_threads(args.threads)
    model, tok, _ = load_for_inference(args.ckpt, args.device, args.dtype, args.tokenizer)
    decoder = Decoder(model)
    if wants_compile(args.compile, model):
        decoder.compile()
    kw = dict(sampling=sampling, max_new_tokens=args.max_new_tokens, seed=args.seed, write=_out, notice=_note,
              decoder=decoder)
    if args.complete:
        return CompletionSession(model, tok, **kw)
    return ChatSession(model, tok, system=args.system, **kw)


def _answer(session, text: str) -> None:
    if not hasattr(session, "respond"):  # a CompletionSession
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
            if hasattr(session, "reset"):
                session.reset()
            _note("[conversation reset]")
            continue
        if cmd.startswith("/") and " " not in cmd:
            _note(f"[unknown command {cmd}; {HELP}]")
            continue
        if interactive and hasattr(session, "respond"):
            _out("assistant: ")
        _answer(session, line)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (newest checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--system", help="system message for chat mode")
    p.add_argument("--prompt", help="answer this one message (or complete this text with --complete) and exit")
    p.add_argument("--complete", action="store_true", help="plain continuation, no chat template (pretrain-only checkpoints)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="auto = int8 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the CPU decode step (~1.5x faster decode; the first start compiles for 30-45 s, "
                        "later ones ~10 s). auto = on for models of >= 20M matmul parameters")
    return run_chat(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
