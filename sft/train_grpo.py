"""GRPO (reinforcement learning with verifiable rewards) of an SFT'd Furnace model on the shared Trainer.

    python sft/train_grpo.py --init runs/sft-tiny-stdlib-bpe4096          # offline default: small arithmetic
    python sft/train_grpo.py --init runs/sft --data problems.jsonl --reward answer:1,format:0.5 --out runs/grpo
Records: {"prompt": "..." | "messages": [...], "answer": "..."} per line. Rewards, loss and its normalisation,
logged metrics: sft/README.md ("GRPO").
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402
from sft.common import parse, run  # noqa: E402

log = logging.getLogger("furnace")
DEFAULT_DIR = Path("runs") / "data" / "grpo-arith"


@dataclass
class GRPOOptions:
    """GRPO's own flags (saved in OUT/config.json under "grpo"; a resumed run must keep them)."""
    num_generations: int = 8      # G completions per prompt
    num_iterations: int = 1       # optimizer steps per batch of samples
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2          # ratio clip range
    reward: str = ""              # name[:weight],...


def grpo_flags() -> argparse.ArgumentParser:
    d = GRPOOptions()
    ap = argparse.ArgumentParser(add_help=False)
    g = ap.add_argument_group("GRPO (--batch-size = prompts per micro-batch)")
    g.add_argument("--num-generations", type=int, default=d.num_generations, metavar="N",
                   help="completions sampled per prompt (the group G whose rewards are compared; >= 2); default: 8")
    g.add_argument("--num-iterations", type=int, default=d.num_iterations, metavar="N",
                   help="optimizer steps on each batch of samples (old log-probs kept); default: 1")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N",
                   help="longest completion, in tokens; default: 32")
    g.add_argument("--temperature", type=float, default=d.temperature, metavar="X",
                   help="sampling temperature of the rollouts (> 0); default: 1.0")
    g.add_argument("--top-p", type=float, default=d.top_p, metavar="X",
                   help="nucleus sampling probability mass of the rollouts; 1.0 = off; default: 1.0")
    g.add_argument("--epsilon", type=float, default=d.epsilon, metavar="X",
                   help="clip range of the policy ratio (1 - eps, 1 + eps); default: 0.2")
    g.add_argument("--beta", type=float, default=0.04, metavar="X",
                   help="weight of the k3 KL penalty to the --init model; 0 = no reference model; default: 0.04")
    g.add_argument("--reward", default="", metavar="S",
                   help="reward functions name[:weight],...: built in 'answer' (exact final answer), 'format' "
                        "(<think>...</think> then an answer), or package.module.function; default: answer:1,format:0.5")
    return ap


def main(argv=None):
    flags = grpo_flags()
    opts, ft = parse("grpo", __doc__, argv, parents=[flags])
    from infer.sampling import check_sampling
    from sft.rewards import DEFAULT_REWARDS, parse_rewards

    g = GRPOOptions(**{k: v for k, v in vars(flags.parse_known_args(argv)[0]).items() if k != "beta"})
    g.reward = g.reward or DEFAULT_REWARDS
    if g.num_generations < 2:
        raise FurnaceError(f"--num-generations {g.num_generations}: expected >= 2 (advantages compare completions of a prompt)")
    if g.num_iterations < 1 or g.max_new_tokens < 1:
        raise FurnaceError(f"--num-iterations {g.num_iterations} / --max-new-tokens {g.max_new_tokens}: expected >= 1")
    if not 0 < g.epsilon < 1:
        raise FurnaceError(f"--epsilon {g.epsilon}: expected a number in (0, 1), e.g. 0.2")
    if not ft.beta >= 0:
        raise FurnaceError(f"--beta {ft.beta}: expected >= 0 (e.g. 0.04; 0 = no KL penalty)")
    check_sampling(g.temperature, None, g.top_p)
    if g.temperature == 0:
        raise FurnaceError("--temperature 0: GRPO needs different completions per prompt; expected > 0 (e.g. 1.0)")
    parse_rewards(g.reward)  # bad names fail here, before anything is written
    if not opts.data:
        opts.data, ft.val_data = default_task(ft.val_data)
    run(opts, ft, lambda o, f, rt, job: grpo_task(o, f, rt, job, g), {"grpo": (asdict(g), tuple(asdict(g)))})
    import os

    from train.metrics import plot_losses
    if os.environ.get("RANK", "0") == "0" and plot_losses(Path(opts.out), REWARD_PANELS, "reward.png"):
        log.info(f"reward curve: {Path(opts.out) / 'reward.png'}")


# The panels of OUT/reward.png (train.metrics.plot_losses): the mean reward of the sampled completions and the
# greedy replies' reward on the held-out prompts, then the completions' mean length.
REWARD_PANELS = (("reward", [("reward", "train (mean of samples)", False), ("val_reward", "val (greedy)", True)]),
                 ("completion length (tokens)", [("completion_len", "train", False)]))


def default_task(val_data: str) -> tuple[str, str]:
    """The offline default: runs/data/grpo-arith/{train,val}.jsonl, small arithmetic from a fixed seed."""
    from model.fileio import atomic_write
    from sft.rewards import arithmetic_problems
    train, val = arithmetic_problems()
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("val", val)):
        atomic_write(DEFAULT_DIR / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    log.info(f"data: the offline default GRPO task ({DEFAULT_DIR}: {len(train)} arithmetic prompts, single-digit answers)")
    return str(DEFAULT_DIR / "train.jsonl"), val_data or str(DEFAULT_DIR / "val.jsonl")


def grpo_record(rec) -> tuple[list, str, str]:
    """{"prompt": str | [messages], "answer": ...} or {"messages": [...], "answer": ...} -> (messages for the
    generation prompt, the last user message's text, the answer as a string)."""
    if not isinstance(rec, dict):
        raise FurnaceError(f"expected an object with 'prompt' (or 'messages') and 'answer', got {type(rec).__name__}")
    if "answer" not in rec:
        raise FurnaceError("no 'answer' (the exact answer the reward checks)")
    ans = rec["answer"]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise FurnaceError(f"'answer' is a {type(ans).__name__}; expected a string or a number")
    msgs = rec.get("prompt", rec.get("messages"))
    if msgs is None:
        raise FurnaceError("no 'prompt' or 'messages'")
    if isinstance(msgs, str):
        msgs = [{"role": "user", "content": msgs}]
    if not isinstance(msgs, list) or not msgs:
        raise FurnaceError("'prompt'/'messages' must be a string or a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise FurnaceError(f"message {i}: expected {{'role': system|user|assistant, 'content': str}}, got {str(m)[:60]}")
    if msgs[-1]["role"] != "user":
        raise FurnaceError(f"the prompt ends with a '{msgs[-1]['role']}' message; it must end with the user's turn")
    return msgs, msgs[-1]["content"], str(ans)


def grpo_task(opts, ft, rt, job, g: GRPOOptions):
    """Prompts, the frozen reference (a copy of the --init weights, made before the Trainer loads resume
    weights or converts layers to FP8) and the GRPO task."""
    import copy

    from data.chat_template import encode_chat, stop_ids
    from sft.common import read_data
    from sft.grpo import GRPOTask, PromptLoader
    from sft.rewards import parse_rewards

    room = opts.seq_len - g.max_new_tokens

    def build(parsed):
        msgs, text, ans = parsed
        ids = encode_chat(job.tok, msgs, add_generation_prompt=True)
        if len(ids) > room:
            raise FurnaceError(f"prompt of {len(ids)} tokens leaves no room for --max-new-tokens {g.max_new_tokens} "
                               f"within --seq-len {opts.seq_len}")
        return ids, text, ans

    train, val, record = read_data(opts, ft, job, grpo_record, build, rt.rank)
    rewards = parse_rewards(g.reward)
    ref = None
    if ft.beta != 0:
        ref = copy.deepcopy(job.model).eval().requires_grad_(False)
    loader = PromptLoader(train, opts.batch_size, opts.grad_accum, g.num_iterations, opts.seed, rt.rank, rt.world_size)
    if not opts.max_steps:  # one pass over the prompts
        per_step = opts.batch_size * opts.grad_accum * rt.world_size
        opts.max_steps = -(-len(train) // per_step) * g.num_iterations
    task = GRPOTask(loader, job.model, ref, job.tok, rewards, num_generations=g.num_generations,
                    max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p if g.top_p < 1 else None,
                    beta=ft.beta, epsilon=g.epsilon, stop_ids=stop_ids(job.tok), seed=opts.seed, rank=rt.rank,
                    val=val[:64], autocast=rt.precision.autocast)  # no MFU: most of a step is sampling
    log.info(f"GRPO: {len(train)} prompts ({len(val)} held out); {opts.batch_size} prompts x {g.num_generations} "
             f"completions x {opts.grad_accum} x {rt.world_size} per step, {g.num_iterations} update(s) per batch of "
             f"samples; rewards {g.reward}; beta {ft.beta}, epsilon {g.epsilon}; {opts.max_steps} steps; out {job.run_dir}")
    log.info("GRPO: the loss unit is a sampled completion token (token-level normalisation over the step); "
             "metrics.jsonl: reward*, completion_len, kl, clip_frac, sample_tok_s, train_tok_s")
    return task, {"grpo": asdict(g), **record}


if __name__ == "__main__":
    run_cli(main)
