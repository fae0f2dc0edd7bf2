"""Terminal chat (and plain completion) with a Furnace checkpoint, CPU by default.

    python infer/chat.py --ckpt runs/sft                      # interactive; /reset, /stats, /exit, Ctrl-D
    python infer/chat.py --ckpt runs/sft --prompt "Hi"        # answer once and exit
    python infer/chat.py --ckpt runs/base --complete --prompt "def fib(n):"
    python infer/chat.py --ckpt runs/sft --compile off        # start at once, decode in eager mode
The read-answer loop: /reset, /stats, /exit or /quit (or Ctrl-D); Ctrl-C stops the current answer, not the
program. stdout holds only the conversation (answers, and the "> " prompts on a terminal; piped answers are
separated by a blank line); every note (the runtime choices, made once before the first prompt, [stopped],
--stats figures) goes to stderr. Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

HELP = ("commands: /reset (forget the conversation), /stats (speed of the last answer), /exit or /quit (or "
        "Ctrl-D); Ctrl-C stops the current answer")


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
    warm_up(model)
    if not args.complete:
        check_chat_trained(args.ckpt)
    kw = dict(sampling=sampling, max_new_tokens=args.max_new_tokens, seed=args.seed, write=_out, notice=_note,
              decoder=decoder)
    if args.complete:
        return CompletionSession(model, tok, **kw)
    return ChatSession(model, tok, system=args.system, **kw)


def warm_up(model) -> None:
    """One forward pass before the first prompt, so the runtime choices it makes once (kernels, attention
    backend) are logged now, on stderr, and never in the middle of an answer."""
    import torch
    with torch.inference_mode():
        model(torch.zeros((1, 1), dtype=torch.long, device=model.embed.weight.device))


def check_chat_trained(ckpt) -> None:
    """A checkpoint that never went through sft/ (no chat_template.json beside its weights) does not know the
    chat format: say so, and what to use instead."""
    from model.io import resolve_checkpoint
    from sft.common import CHAT_TEMPLATE_FILE
    d = resolve_checkpoint(ckpt)
    if not (d / CHAT_TEMPLATE_FILE).is_file():
        _note(f"note: {d} was not fine-tuned for chat (no {CHAT_TEMPLATE_FILE}: a pretraining checkpoint?); its "
              f"chat answers will be noise. Use --complete for plain continuation, or fine-tune it with "
              f"python sft/train_sft.py --init {ckpt}")


class Stats:
    """Tokens and seconds of the last answer (prompt processing included)."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def line(self) -> str:
        if not self.tokens:
            return "[stats: no answer yet]"
        return f"[stats: {self.tokens} tokens in {self.seconds:.2f} s, {self.tokens / self.seconds:.1f} tokens/s]"


def _answer(session, text: str, stats: Stats, show_stats: bool) -> None:
    import time
    t0 = time.perf_counter()
    if not hasattr(session, "respond"):  # a CompletionSession
        answer, interrupted = session.complete(text)
    else:
        answer, interrupted = session.respond(text)
    stats.seconds = time.perf_counter() - t0
    stats.tokens = len(session.tok.encode(answer)) if answer else 0
    _out("\n")
    if interrupted:
        _note("[stopped]")
    if show_stats:
        _note(stats.line())


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
    stats = Stats()
    if args.prompt is not None:
        _answer(session, args.prompt, stats, args.stats)
        return 0
    interactive = sys.stdin.isatty()
    answered = False
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
        if cmd == "/stats":
            _note(stats.line())
            continue
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
        elif not interactive and answered:
            _out("\n")  # piped: a blank line between answers
        _answer(session, line, stats, args.stats)
        answered = True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (its newest checkpoint); required")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--system", help="system message for chat mode; default: none")
    p.add_argument("--prompt", help="answer this one message (or complete this text with --complete) and exit; "
                                    "default: read messages from the terminal or stdin")
    p.add_argument("--complete", action="store_true",
                   help="plain continuation, no chat template (pretrain-only checkpoints); default: off (chat)")
    p.add_argument("--stats", action="store_true",
                   help="after each answer, print its tokens and tokens/s on stderr (or type /stats); default: off")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens; default: 256")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; default: 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens; default: all")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample within this probability mass (nucleus); default: 1.0 (off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen by this (> 1 repeats less); default: 1.0 (off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (answers repeat); default: random")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="weight precision; default: auto = int8 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the CPU decode step (~1.5x faster decode; the first start compiles for 30-45 s, "
                        "later ones ~10 s); default: auto = on for models of >= 20M matmul parameters")
    return run_chat(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
