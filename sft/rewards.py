"""GRPO's rewards and its offline default task. A reward is a plain callable `reward(prompt, completion, answer)
-> float` (the last user message, the sampled reply without <|im_end|>, the record's answer); `--reward
name[:weight],...` picks built-in ones or `package.module.function`; a completion's total is the weighted sum.
Built in: `format` (1 for `<think>...</think>` then a non-empty answer, DeepSeek-R1's format reward) and
`answer` (1 when the final answer, the last number after the last `</think>` or else the stripped text,
equals the record's answer as a string).
"""
from __future__ import annotations

import importlib
import math
import random
import re
from typing import Callable

from kernels.common import FurnaceError

Reward = Callable[[str, str, str], float]
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*\S.*", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def think_format(prompt: str, completion: str, answer: str) -> float:
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


def final_answer(completion: str) -> str:
    tail = completion.rsplit("</think>", 1)[-1]
    nums = _NUMBER.findall(tail)
    return nums[-1] if nums else tail.strip()


def exact_answer(prompt: str, completion: str, answer: str) -> float:
    return 1.0 if final_answer(completion) == str(answer).strip() else 0.0


BUILTIN: dict[str, Reward] = {"format": think_format, "answer": exact_answer}
DEFAULT_REWARDS = "answer:1,format:0.5"


def parse_rewards(spec: str) -> list[tuple[str, Reward, float]]:
    """'answer:1,format:0.5' -> [(name, function, weight), ...]; FurnaceError naming the bad part."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise FurnaceError(f"--reward {part}: weight {w!r} is not a number (expected name[:weight])") from None
        if not math.isfinite(weight):
            raise FurnaceError(f"--reward {part}: weight {w!r} is not finite")
        out.append((name, resolve_reward(name), weight))
    if not out:
        raise FurnaceError(f"--reward {spec!r}: no reward function given (built in: {', '.join(BUILTIN)})")
    if len({n for n, _, _ in out}) != len(out):
        raise FurnaceError(f"--reward {spec}: a reward function is named twice")
    return out


def resolve_reward(name: str) -> Reward:
    if name in BUILTIN:
        return BUILTIN[name]
    mod, _, fn = name.rpartition(".")
    if not mod:
        raise FurnaceError(f"--reward {name}: unknown reward function; built in: {', '.join(BUILTIN)}, or give "
                           f"an importable package.module.function")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise FurnaceError(f"--reward {name}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(f):
        raise FurnaceError(f"--reward {name}: is a {type(f).__name__}, not a function")
    return f


def score(rewards: list[tuple[str, Reward, float]], prompts: list[str], completions: list[str],
          answers: list[str]) -> list[list[float]]:
    """(N, K) rewards of N completions under K functions; FurnaceError naming the function and the completion
    when one raises or returns something that is not a finite number."""
    out = []
    for i, (p, c, a) in enumerate(zip(prompts, completions, answers)):
        row = []
        for name, fn, _ in rewards:
            try:
                r = fn(p, c, a)
            except Exception as e:  # noqa: BLE001 - a user's function: report it with its name
                raise FurnaceError(f"reward function {name!r} raised {type(e).__name__}: {e} (completion {i}: "
                                   f"{c[:60]!r})") from None
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise FurnaceError(f"reward function {name!r} returned {r!r} for completion {i} ({c[:60]!r}); "
                                   f"expected a finite float")
            row.append(float(r))
        out.append(row)
    return out


# ---- the offline default task: small arithmetic with single-digit answers --------------------------------
ARITH_SEED = 1234   # fixes which 16 of the 80 distinct problems are held out


def arithmetic_record(a: int, b: int) -> dict:
    """{"prompt", "answer"}: "What is a + b?" when a + b < 10, else "What is max - min?"; one-digit answer."""
    if a + b < 10:
        return {"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"What is {a} - {b}?", "answer": str(a - b)}


def _split_problems(seed: int):
    """The 80 distinct problems of a, b in 0..9 (55 sums, 25 differences), shuffled: (held out 16, train 64, rng)."""
    rng = random.Random(seed)
    probs = sorted({tuple(arithmetic_record(a, b).values()) for a in range(10) for b in range(10)})
    rng.shuffle(probs)
    return probs[:16], probs[16:], rng


def arithmetic_problems(n_train: int = 512, n_val: int = 64, seed: int = ARITH_SEED) -> tuple[list[dict], list[dict]]:
    """Records {"prompt", "answer"} (arithmetic_record, a, b in 0..9) drawn from a seed; the validation
    records come from 16 of the 80 distinct problems that the training records never use."""
    val_probs, train_probs, rng = _split_problems(seed)
    train = [dict(zip(("prompt", "answer"), rng.choice(train_probs))) for _ in range(n_train)]
    return train, [dict(zip(("prompt", "answer"), rng.choice(val_probs))) for _ in range(n_val)]


def arithmetic_conversations(n: int, seed: int) -> list[list[dict]]:
    """n SFT conversations on the training problems of arithmetic_problems() (never its held-out ones), drawn
    with their own seed: user = the GRPO prompt, assistant = reasoning "a + b = c" and content "c", i.e. the
    `<think>` format and final answer that the format and answer rewards score 1.0."""
    _, train_probs, _ = _split_problems(ARITH_SEED)
    rng = random.Random(seed)
    return [[{"role": "user", "content": p}, {"role": "assistant", "reasoning": f"{p[8:-1]} = {a}", "content": a}]
            for p, a in (rng.choice(train_probs) for _ in range(n))]
