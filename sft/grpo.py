"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): advantages, the loss, rollouts, the task.

Per micro-batch: P prompts, G completions each, sampled from the current policy (infer.generation.generate_batch:
all P x G rows in one KV-cached batch), scored by the reward functions (sft/rewards.py), then

    A_i     = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          std with Bessel's correction, as TRL
    ratio_t = exp(logp_t - old_logp_t)
    pg_t    = -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1               the k3 estimator (Schulman), >= 0
    loss    = sum_t mask_t * (pg_t + beta * kl_t) / sum_t mask_t       over every completion token of the step

Why per token over the step (DAPO), --num-iterations and old_logp, the frozen reference: sft/README.md ("GRPO").
"""
from __future__ import annotations

import time

import numpy as np
import torch

from model.io import eval_mode
from sft.dpo import token_logps
from sft.examples import IGNORE
from sft.packing import padded_rows
from sft.rewards import score
from sft.sampler import EpochSampler

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """rewards (P*G,) in prompt-major order -> (P*G,) (r - group mean) / (group std + eps). A group whose
    rewards are all equal gets advantage 0 (std 0: 0 / eps)."""
    r = rewards.float().view(-1, group_size)                                   # (P, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float, epsilon: float = 0.2):
    """logps, old_logps, ref_logps, mask: (N, T) per completion token (mask: 1 = a sampled token);
    advantages (N,). -> (loss: token mean over the batch, {"kl", "clip_frac", "ratio"} token means)."""
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    adv = advantages.float()[:, None]                                          # (N, 1)
    ratio = torch.exp(logps - old_logps)                                       # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    mets = {}
    if ref_logps is not None and beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1                                              # (N, T)
        per_token = per_token + beta * kl
        mets["kl"] = ((kl * m).sum() / n).item()
    loss = (per_token * m).sum() / n
    # a token is clipped when the clipped term is the one chosen: ratio beyond the range in the advantage's direction
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    mets["clip_frac"] = ((is_clipped.float() * m).sum() / n).item()
    mets["ratio"] = ((ratio.detach() * m).sum() / n).item()
    return loss, mets


def rollout_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Prompt + completion per row, right-padded -> x, y (N, L); y holds the completion's tokens at the
    positions that predict them (IGNORE elsewhere)."""
    return padded_rows([(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompts, completions)], pad_id)


class PromptLoader:
    """Prompts for GRPO, and the samples of the batch in progress. next_batch() -> {"slot", "iteration"}:
    micro-batch `slot` (0..grad_accum-1) of iteration `iteration` (0..num_iterations-1) of a batch of prompts.
    At iteration 0 a slot takes the next P prompts (sft/sampler.py order) and is emptied; the task fills it
    with samples. The slots are part of state_dict, so a run resumed in the middle of --num-iterations
    reuses the same samples (and old log-probs)."""

    def __init__(self, items: list, batch_size: int, grad_accum: int = 1, num_iterations: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.items, self.P, self.A, self.mu = items, batch_size, grad_accum, num_iterations
        self.sampler = EpochSampler(len(items), seed, True, rank, world_size)
        self.calls = 0
        self.slots: list[dict] = [{} for _ in range(grad_accum)]

    def next_batch(self) -> dict:
        k = self.calls
        self.calls += 1
        slot, it = k % self.A, (k // self.A) % self.mu
        if it == 0:
            self.slots[slot] = {"idx": self.sampler.take(self.P), "batch": k // (self.A * self.mu)}
        return {"slot": slot, "iteration": it}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "calls": self.calls, "slots": self.slots}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.calls, self.slots = int(state["calls"]), list(state["slots"])


class GRPOTask:
    """The Trainer's task for GRPO (train/task.py). The loss unit is a sampled completion token. count()
    needs the completions' lengths, so a slot's samples are drawn at the first of count/loss in the step (both
    run inside the Trainer's step, before any backward, with the step's weights)."""
    unit = "tok"

    def __init__(self, loader: PromptLoader, policy, ref, tokenizer, rewards, *, num_generations: int,
                 max_new_tokens: int, temperature: float, top_p: float | None, beta: float, epsilon: float,
                 stop_ids, seed: int, rank: int = 0, val: list | None = None, autocast=None,
                 flops_per_unit: float = 0.0):
        self.train_loader, self.policy, self.ref, self.tok, self.rewards = loader, policy, ref, tokenizer, rewards
        self.G, self.max_new, self.temperature, self.top_p = num_generations, max_new_tokens, temperature, top_p
        self.beta, self.epsilon, self.stop_ids, self.seed, self.rank = beta, epsilon, tuple(stop_ids), seed, rank
        self.val, self.autocast, self.flops_per_unit = val or [], autocast, flops_per_unit
        self._sample_s, self._gen_tokens, self._train_tokens = 0.0, 0, 0

    def _ctx(self, device):
        return self.autocast(device.type) if self.autocast else torch.autocast(device.type, enabled=False)

    def _complete(self, items: list, seeds, temperature: float):
        """Completions of `items` ((prompt ids, prompt text, answer) each) -> (completions, rewards (N, K),
        total reward (N,))."""
        from infer.generation import generate_batch
        with eval_mode(self.policy) as model, self._ctx(model.embed.weight.device):
            comps = generate_batch(model, [it[0] for it in items], self.max_new, temperature, None, self.top_p,
                                   self.stop_ids, seeds)
        texts = [self.tok.decode([t for t in c if t not in self.stop_ids]) for c in comps]
        r = torch.tensor(score(self.rewards, [it[1] for it in items], texts, [it[2] for it in items]))   # (N, K)
        return comps, r, r @ torch.tensor([wt for _, _, wt in self.rewards])                            # (N,)

    def rollout(self, slot: dict) -> dict:
        """Fill `slot` ({"idx", "batch"}) with G samples per prompt, their rewards, advantages and reference
        log-probs. Seeds per row from (--seed, batch number, slot's prompts, rank): resume reproduces them."""
        items = [self.train_loader.items[i] for i in slot["idx"] for _ in range(self.G)]
        seq = np.random.SeedSequence([self.seed, slot["batch"], self.rank, *slot["idx"]])
        t0 = time.perf_counter()
        comps, r, total = self._complete(items, seq.generate_state(len(items), dtype=np.uint32).tolist(),
                                         self.temperature)
        dt = time.perf_counter() - t0
        prompts = [it[0] for it in items]
        x, y = rollout_rows(prompts, comps, self.tok.eos_id)
        slot.update(x=x, y=y, rewards=r, total=total, adv=group_advantages(total, self.G),
                    comp_len=torch.tensor([float(len(c)) for c in comps]), sample_s=dt,
                    gen_tokens=sum(len(c) for c in comps), seq_tokens=sum(len(p) + len(c) for p, c in zip(prompts, comps)))
        if self.ref is not None and self.beta != 0.0:
            dev = self.ref.embed.weight.device
            with torch.no_grad(), self._ctx(dev):
                slot["ref"] = token_logps(self.ref, x.to(dev), y.to(dev)).float().cpu()  # (N, L)
        self._sample_s += dt
        self._gen_tokens += slot["gen_tokens"]
        return slot

    def _slot(self, batch: dict) -> dict:
        slot = self.train_loader.slots[batch["slot"]]
        return slot if "x" in slot else self.rollout(slot)

    # ---- the task interface -------------------------------------------------------------------------
    def count(self, batch: dict) -> int:
        return int((self._slot(batch)["y"] != IGNORE).sum())

    def loss(self, model, batch: dict):
        slot = self._slot(batch)
        dev = self.policy.embed.weight.device
        x, y = slot["x"].to(dev), slot["y"].to(dev)
        logps = token_logps(model, x, y)                                                   # (N, L)
        if batch["iteration"] == 0:
            old = logps.detach()
            if self.train_loader.mu > 1:
                slot["old"] = old.float().cpu()
        else:
            old = slot["old"].to(dev)
        ref = slot["ref"].to(dev) if "ref" in slot else None
        loss, mets = grpo_loss(logps, old, ref, slot["adv"].to(dev), y != IGNORE, self.beta, self.epsilon)
        self._train_tokens += slot["seq_tokens"]                                           # prompt + completion
        r, total = slot["rewards"], slot["total"]
        mets.update(reward=total.mean().item(), reward_std=total.std().item(), completion_len=slot["comp_len"].mean().item())
        for k, (name, _, _) in enumerate(self.rewards):
            mets[f"reward_{name}"] = r[:, k].mean().item()
            mets[f"reward_{name}_std"] = r[:, k].std().item()
        return loss, mets

    def step_metrics(self, step_s: float) -> dict:
        """Called by the Trainer after each step with its wall time: sampling and training throughput apart."""
        out = {}
        if self._sample_s > 0:
            out.update(sample_tok_s=self._gen_tokens / self._sample_s, sample_s=self._sample_s)
        if step_s - self._sample_s > 0 and self._train_tokens:
            out["train_tok_s"] = self._train_tokens / (step_s - self._sample_s)
        self._sample_s, self._gen_tokens, self._train_tokens = 0.0, 0, 0
        return out

    @torch.no_grad()
    def evaluate(self, model, final: bool = True) -> dict:
        """Greedy replies to the held-out prompts: mean reward per function and in total (val_reward)."""
        if not self.val:
            return {}
        _, r, total = self._complete(self.val, None, 0.0)
        return {"val_reward": total.mean().item(), **{f"val_reward_{name}": r[:, k].mean().item()
                                                      for k, (name, _, _) in enumerate(self.rewards)}}
