"""Direct Preference Optimization: the loss, sequence log-probs, pair batches, the task and the reference cache.

    loss = -mean(log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))))     (Rafailov et al. 2023, sigmoid loss)
    chosen_reward = beta * (pi_c - ref_c), rejected_reward = beta * (pi_r - ref_r)
pi_* / ref_* are the policy's / reference's log-probabilities of a completion (the final assistant reply and
its <|im_end|>), summed over its tokens. The reference (the frozen --init model) is computed once and cached
on disk, so training holds only the policy. At step 0 policy == reference, so the loss is ln 2.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kernels.common import FurnaceError
from model.fileio import atomic_path
from model.io import eval_mode
from sft.examples import IGNORE
from sft.packing import padded_rows
from sft.sampler import EpochSampler, SamplerLoader

log = logging.getLogger("furnace")

Pair = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]  # ((ids, labels) chosen, rejected)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float):
    """All inputs (P,) summed log-probs. -> (mean loss over pairs, chosen_rewards (P,), rejected_rewards (P,));
    the rewards are detached (for logging)."""
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def token_logps(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y (N, T): inputs and targets (IGNORE = no target) -> (N, T) float32 log p(y_t | x_<=t), 0 where
    there is no target. Goes through model.forward (DDP / compile wrappers stay in the graph); only the
    target rows of the logits are normalised."""
    logits, _ = model(x)                                                  # (N, T, V)
    mask = y != IGNORE                                                    # (N, T)
    lp = torch.log_softmax(logits[mask].float(), dim=-1).gather(1, y[mask][:, None]).squeeze(1)  # (M,)
    return torch.zeros(y.shape, device=x.device, dtype=torch.float32).masked_scatter(mask, lp)


def sequence_logps(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y: (B, T) inputs and targets (-100 = not part of the completion) -> (B,) float32 sums of
    log p(y_t | x_<=t) over the completion's positions."""
    return token_logps(model, x, y).sum(1)


def pair_batch(pairs: list[Pair], pad_id: int, max_len: int):
    """-> x, y (2P, L): chosen rows first, then rejected (sft.packing.padded_rows)."""
    return padded_rows([p[0] for p in pairs] + [p[1] for p in pairs], pad_id, max_len)


class PairLoader(SamplerLoader):
    """next_batch() -> {"x", "y": (2B, L), "ref": (2B,) reference log-probs or None, "n": B}, pairs in the
    order of sft/sampler.py (seeded per epoch, dealt to ranks, exact resume)."""

    def __init__(self, pairs: list[Pair], ref: torch.Tensor | None, batch_size: int, pad_id: int, max_len: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, device="cpu"):
        self.pairs, self.ref, self.B, self.pad_id, self.max_len = pairs, ref, batch_size, pad_id, max_len
        self.sampler = EpochSampler(len(pairs), seed, shuffle, rank, world_size)
        self.device = torch.device(device)

    def next_batch(self) -> dict:
        idx = self.sampler.take(self.B)
        x, y = pair_batch([self.pairs[i] for i in idx], self.pad_id, self.max_len)
        nb = self.device.type == "cuda"
        b = {"x": x.to(self.device, non_blocking=nb), "y": y.to(self.device, non_blocking=nb), "n": len(idx)}
        if self.ref is not None:
            b["ref"] = torch.cat([self.ref[idx, 0], self.ref[idx, 1]]).to(self.device)   # (2B,)
        return b


class DPOTask:
    """The Trainer's task for DPO (train/task.py): the loss unit is a preference pair. Evaluation: loss and
    reward metrics on a fixed probe of training pairs (train_*) and on the held-out pairs (val_*)."""
    unit = "pair"

    def __init__(self, train_loader: PairLoader, beta: float, val: list[Pair], ref_val: torch.Tensor | None,
                 flops_per_unit: float, device, autocast, n_probe: int = 64):
        self.train_loader, self.beta, self.flops_per_unit = train_loader, beta, flops_per_unit
        n = min(len(train_loader.pairs), n_probe)
        self.eval_sets = [("train_", train_loader.pairs[:n], train_loader.ref[:n])]
        if val:
            self.eval_sets.append(("val_", val, ref_val))
        self.device, self.autocast = device, autocast

    def count(self, batch: dict) -> int:
        return int(batch["n"])

    def loss(self, model, batch: dict):
        """(mean loss over the batch's pairs, reward metrics)."""
        n, ref = batch["n"], batch["ref"]
        logps = sequence_logps(model, batch["x"], batch["y"])                # (2n,)
        loss, cr, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
        return loss, pair_metrics(cr, rr)

    def evaluate(self, model, final: bool = True) -> dict:
        """Loss and reward metrics over each evaluation set once (means over pairs)."""
        ld, out = self.train_loader, {}
        for prefix, pairs, ref in self.eval_sets:
            logps = reference_logps(model, pairs, ld.B, ld.pad_id, ld.max_len, self.device, self.autocast)  # (N, 2)
            loss, cr, rr = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], self.beta)
            out.update({prefix + k: v for k, v in {"loss": loss.item(), **pair_metrics(cr, rr)}.items()})
        return out


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    return {"reward_acc": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item()}


# ---- reference log-probs, cached -----------------------------------------------------------------
@torch.no_grad()
def reference_logps(model, pairs: list[Pair], batch_size: int, pad_id: int, max_len: int, device,
                    autocast=None) -> torch.Tensor:
    """(N, 2) float32: `model`'s summed completion log-probs of each pair's (chosen, rejected), on the CPU
    (the frozen --init model's before training: the reference; the policy's when evaluating)."""
    dev, out = torch.device(device), []
    with eval_mode(model), (autocast(dev.type) if autocast else torch.autocast(dev.type, enabled=False)):
        for s in range(0, len(pairs), batch_size):
            x, y = pair_batch(pairs[s:s + batch_size], pad_id, max_len)
            out.append(sequence_logps(model, x.to(dev), y.to(dev)).cpu().view(2, -1).T)   # (n, 2)
    return torch.cat(out)


def cached_reference_logps(cache_dir: Path, ckpt_key: str, pairs: list[Pair], compute) -> torch.Tensor:
    """Load CACHE/ref-<ckpt>-<data>.safetensors when its keys match, else `compute()` and write it atomically.
    The data key hashes the tokenized pairs (ids and labels): files, formats, template and truncation at once."""
    h = hashlib.sha256()
    for seq in (seq for pair in pairs for side in pair for seq in side):
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    data_key = h.hexdigest()
    path = Path(cache_dir) / f"ref-{ckpt_key[:16]}-{data_key[:16]}.safetensors"
    if path.is_file():
        try:  # safetensors: reading the cache never executes code
            with safe_open(str(path), framework="pt") as f:
                meta, logps = f.metadata() or {}, f.get_tensor("logps")
        except (SafetensorError, OSError, KeyError) as e:  # truncated or foreign file: recompute rather than trust it
            log.info(f"DPO reference cache {path} unreadable ({type(e).__name__}); recomputing")
        else:
            if meta.get("ckpt_key") == ckpt_key and meta.get("data_key") == data_key and logps.shape == (len(pairs), 2):
                log.info(f"DPO reference log-probs: cached {path}")
                return logps
            log.info(f"DPO reference cache {path} does not match this checkpoint/data; recomputing")
    logps = compute()
    if not torch.isfinite(logps).all():
        raise FurnaceError("DPO reference log-probs are not finite: the --init model is broken (NaN weights?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"logps": logps.contiguous()}, str(tmp), metadata={"ckpt_key": ckpt_key, "data_key": data_key})
    log.info(f"DPO reference log-probs: computed for {len(pairs)} pairs, cached in {path}")
    return logps


LN2 = math.log(2.0)
