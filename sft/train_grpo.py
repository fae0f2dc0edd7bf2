"""GRPO (reinforcement learning with verifiable rewards) of an SFT'd Furnace model on the shared Trainer.

    python sft/train_grpo.py --init runs/sft-tiny-stdlib-bpe4096          # offline default: small arithmetic
    python sft/train_grpo.py --init runs/sft --data problems.jsonl --reward answer:1,format:0.5 --out runs/grpo
Records: {"prompt": "..." | "messages": [...], "answer": "..."} per line. Rewards, loss and its normalisation,
logged metrics: sft/README.md ("GRPO").
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402
import os  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402
from sft.common import ft_field, parse, run  # noqa: E402

log = logging.getLogger("furnace")
GROUP = "GRPO (--batch-size = prompts per micro-batch)"
# The panels of OUT/reward.png (train.metrics.plot_losses): the mean reward of the sampled completions and the
# greedy replies' reward on the held-out prompts, then the completions' mean length.
REWARD_PANELS = (("reward", [("reward", "train (mean of samples)", False), ("val_reward", "val (greedy)", True)]),
                 ("completion length (tokens)", [("completion_len", "train", False)]))


@dataclass
class GRPOOptions:
    """GRPO's own flags (saved in OUT/config.json under "grpo"; a resumed run must keep them). Its --beta (the
    KL weight) is FinetuneOptions.beta."""
    num_generations: int = ft_field(8, "completions sampled per prompt (the group G whose rewards are compared; >= 2); "
                               "default: 8", "grpo", GROUP)
    num_iterations: int = ft_field(1, "optimizer steps on each batch of samples (old log-probs kept); default: 1",
                              "grpo", GROUP)
    max_new_tokens: int = ft_field(32, "longest completion, in tokens; default: 32", "grpo", GROUP)
    temperature: float = ft_field(1.0, "sampling temperature of the rollouts (> 0); default: 1.0", "grpo", GROUP)
    top_p: float = ft_field(1.0, "nucleus sampling probability mass of the rollouts; 1.0 = off; default: 1.0", "grpo",
                       GROUP)
    epsilon: float = ft_field(0.2, "clip range of the policy ratio (1 - eps, 1 + eps); default: 0.2", "grpo", GROUP)
    reward: str = ft_field("", "reward functions name[:weight],...: built in 'answer' (exact final answer), 'format' "
                      "(<think>...</think> then an answer), or package.module.function; default: answer:1,format:0.5",
                      "grpo", GROUP)


def main(argv=None):
    opts, ft, g = parse("grpo", __doc__, argv, GRPOOptions)
    from infer.sampling import check_sampling
    from sft.rewards import DEFAULT_REWARDS, parse_rewards
    from train.metrics import plot_losses

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
    code = run(opts, ft, lambda o, f, rt, job: grpo_task(o, f, rt, job, g), {"grpo": (asdict(g), tuple(asdict(g)))})
    if os.environ.get("RANK", "0") == "0" and plot_losses(Path(opts.out), REWARD_PANELS, "reward.png"):
        log.info(f"reward curve: {Path(opts.out) / 'reward.png'}")
    return code


def grpo_task(opts, ft, rt, job, g: GRPOOptions):
    """Prompts, the frozen reference (a copy of the --init weights, made before the Trainer loads resume
    weights or converts layers to FP8) and the GRPO task."""
    import copy

    from data.chat_template import encode_chat, stop_ids
    from sft.common import read_data, set_max_steps
    from sft.formats import grpo_record
    from sft.grpo import GRPOTask, PromptLoader
    from sft.rewards import parse_rewards

    def build(parsed):
        msgs, text, ans = parsed
        ids = encode_chat(job.tok, msgs, add_generation_prompt=True)
        if len(ids) > opts.seq_len - g.max_new_tokens:
            raise FurnaceError(f"prompt of {len(ids)} tokens leaves no room for --max-new-tokens {g.max_new_tokens} "
                               f"within --seq-len {opts.seq_len}")
        return ids, text, ans

    train, val, record = read_data(opts, ft, job, grpo_record, build, rt.rank)
    ref = copy.deepcopy(job.model).eval().requires_grad_(False) if ft.beta != 0 else None
    loader = PromptLoader(train, opts.batch_size, opts.grad_accum, g.num_iterations, opts.seed, rt.rank, rt.world_size)
    set_max_steps(opts, rt.world_size, len(train), epochs=1, times=g.num_iterations)  # one pass over the prompts
    task = GRPOTask(loader, job.model, ref, job.tok, parse_rewards(g.reward), num_generations=g.num_generations,
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
