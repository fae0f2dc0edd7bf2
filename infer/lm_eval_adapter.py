"""EleutherAI lm-eval model class for Furnace checkpoints (registered as `furnace`).

loglikelihood: requests are sorted by length and run in batches, right-padded; causal attention means
padding after a sequence never changes its scores, and only the continuation positions go through the LM
head (so batch 1 and batch 8 agree to float rounding). Sequences longer than the context keep their last
max_seq_len + 1 tokens (the context is cut from the left). loglikelihood_rolling: lm-eval's disjoint
rolling windows, scored in the same batches. generate_until: one request at a time with the KV cache
(greedy unless the task asks for sampling), stopped at the first `until` string or end-of-text.
With --dtype int8 activations are quantized per batch, so scores then depend slightly on batch size:
evaluate in fp32 (the default) when numbers are to be compared.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.chat_template import IM_START, JINJA_TEMPLATE, render
from infer.generation import generate
from model.gpt import GPT

log = logging.getLogger("furnace")


class _Stop(Exception):
    """Raised from the streaming callback once an `until` string has been produced."""


@register_model("furnace")
class FurnaceLM(TemplateLM):
    def __init__(self, model: GPT | None = None, tokenizer=None, batch_size: int = 8, ckpt: str | None = None,
                 dtype: str = "fp32", device: str = "cpu", **kw):
        super().__init__()
        if model is None:  # lm_eval's own CLI: --model furnace --model_args ckpt=DIR,dtype=fp32
            from infer.runtime import load_for_inference
            model, tokenizer, _ = load_for_inference(ckpt, device, dtype)
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        self._device = model.embed.weight.device

    # ---- lm-eval plumbing ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"furnace-{self.tok.sha256[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return JINJA_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt and chat_history and chat_history[-1]["role"] == "assistant":
            # lm-eval prefills the start of the answer: leave that assistant turn open.
            return render(chat_history[:-1]) + f"{IM_START}assistant\n" + chat_history[-1]["content"]
        return render(chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # ---- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation | context), continuation is greedy)."""
        T = self.max_length
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("lm-eval request with an empty continuation")
            full = (list(ctx) + list(cont))[-(T + 1):]
            items.append((i, full[:-1], full[len(full) - min(len(cont), T):]))   # (index, input, targets)
        order = sorted(items, key=lambda it: -len(it[1]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            L = len(chunk[0][1])
            x = torch.full((len(chunk), L), self.eot_token_id, dtype=torch.long)   # (B, L) right-padded
            for r, (_, inp, _) in enumerate(chunk):
                x[r, :len(inp)] = torch.tensor(inp)
            h = self.model.hidden_states(x.to(self._device))                        # (B, L, d)
            for r, (i, inp, tgt) in enumerate(chunk):
                n, c = len(inp), len(tgt)
                logits = self.model.lm_head(h[r, n - c:n]).float()                  # (c, V)
                logp = F.log_softmax(logits, dim=-1)
                t = torch.tensor(tgt, device=logp.device)
                ll = logp.gather(1, t[:, None]).sum().item()
                results[i] = (ll, bool((logp.argmax(-1) == t).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        out = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        scores = self.score_tokens(windows)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.eot_token_id]
            new: list[int] = []

            def on_token(t: int, new=new, until=until) -> None:
                new.append(t)
                if until and any(u in self.tok.decode(new) for u in until):
                    raise _Stop

            try:
                generate(self.model, ids, max_new, temperature=temperature, stop_ids=(self.eot_token_id,),
                         on_token=on_token)
            except _Stop:
                pass
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            text = self.tok.decode(new)
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out
