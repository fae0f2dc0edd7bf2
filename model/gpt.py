"""The GPT core: a Llama-style decoder (RMSNorm, GQA + RoPE, SwiGLU, tied LM head, no biases).

All elementwise / normalisation / loss math goes through `kernels` with one switch
(`config.kernels`: auto | torch | triton | liger), so every impl gives the same logits and loss.

Init (documented, GPT-2 / nanoGPT style): every Linear and the embedding ~ N(0, init_std=0.02);
the two residual projections (attn.o_proj, mlp.down_proj) ~ N(0, 0.02 / sqrt(2 * n_layer)) so the
residual stream's variance does not grow with depth; norm weights = 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels import apply_rope, cross_entropy, fused_linear_cross_entropy, rms_norm, swiglu
from model.attention import causal_attention
from model.config import GPTConfig
from model.flops import flops_per_token, matmul_params
from model.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.cfg.norm_eps, impl=self.cfg.kernels)


class KVCache:
    """Preallocated keys/values for incremental decoding. `pos` = number of positions filled.

    One tensor per layer (not one (L, ...) tensor) and writes through `index_copy_`: a compiled decode step
    (infer.decode) then updates the cache in place instead of copying a whole functional cache per layer."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, max_len, cfg.n_kv_head, cfg.head_dim)                # (B, Tmax, Hkv, hd)
        with torch.inference_mode(False):  # the same kind of tensor whether made inside inference mode or not
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, Hkv, hd) at positions pos..pos+T-1 of `layer`; return that layer's keys and
        values for positions 0..pos+T-1, (B, pos+T, Hkv, hd) each (views, no copy)."""
        B, T = k.shape[:2]
        idx = torch.arange(self.pos, self.pos + T, device=k.device)
        ck, cv = self.k[layer], self.v[layer]
        if B == ck.shape[0]:
            ck.index_copy_(1, idx, k)
            cv.index_copy_(1, idx, v)
        else:                                                                      # a smaller batch
            ck[:B].index_copy_(1, idx, k)
            cv[:B].index_copy_(1, idx, v)
        return ck[:B, :self.pos + T], cv[:B, :self.pos + T]

    def write_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, Tk: int):
        """Rows at different positions (continuous batching): store row b's k, v (B, T, Hkv, hd) at positions
        p[b] (p: (B, T) int64); return the first B rows' keys and values for positions 0..Tk-1 (views)."""
        B, T = k.shape[:2]
        b = torch.arange(B, device=k.device)[:, None].expand(B, T)                 # (B, T)
        ck, cv = self.k[layer][:B], self.v[layer][:B]
        ck.index_put_((b, p), k)
        cv.index_put_((b, p), v)
        return ck[:, :Tk], cv[:, :Tk]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop-1 that shares this one's storage (views), at position 0."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.max_len, view.pos = self.max_len, 0
        return view

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Copy row src's first n positions to row dst (moves a sequence to another slot)."""
        for t in self.k + self.v:
            t[dst, :n] = t[src, :n]

    def reset(self):
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, kv_dim = cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg), RMSNorm(hd, cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, doc_ids=None, rows=None):
        """rows: (p (B, T) positions, mask (B, 1, T, Tk)) when the rows sit at different positions
        (GPT.hidden_states' row_pos); cos, sin are then (B, T, hd/2)."""
        B, T, _ = x.shape
        cfg, impl = self.cfg, self.cfg.kernels
        q, k, v = self.project(x)
        q = q.view(B, T, cfg.n_head, cfg.head_dim)                      # (B, T, H, hd)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim)                   # (B, T, Hkv, hd)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim)                   # (B, T, Hkv, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin, impl), _rope(k, cos, sin, impl)
        if rows is not None:
            p, mask = rows
            k, v = cache.write_rows(self.layer, k, v, p, mask.shape[-1])      # (B, Tk, Hkv, hd) each
            y = causal_attention(q, k, v, attn_mask=mask)                     # (B, T, H, hd)
            return self.o_proj(y.reshape(B, T, cfg.n_embd))
        if cache is not None:
            k, v = cache.write(self.layer, k, v)                       # (B, pos+T, Hkv, hd) each
        y = self.attend(q, k, v, doc_ids)                              # (B, T, H, hd)
        return self.o_proj(y.reshape(B, T, cfg.n_embd))

    def project(self, x):
        """x (B, T, d) -> q (B, T, d), k and v (B, T, kv_dim). infer.quant swaps in a fused subclass."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q, k, v, doc_ids=None):
        """causal_attention; infer.quant's subclass takes one-query decode steps to a C++ kernel on CPU."""
        return causal_attention(q, k, v, doc_ids)


def _rope(x, cos, sin, impl):
    """x: (B, T, H, hd); cos, sin: (T, hd/2) shared by all rows, or (B, T, hd/2) per row (rows at different
    positions: the B*T positions then go through the kernel as one sequence)."""
    if cos.dim() == 2:
        return apply_rope(x, cos, sin, impl=impl)
    B, T = x.shape[:2]
    y = apply_rope(x.reshape(1, B * T, *x.shape[2:]), cos.reshape(B * T, -1), sin.reshape(B * T, -1),
                   impl=impl)                                                   # (1, B*T, H, hd)
    return y.view(x.shape)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def gate_up(self, x):
        """x (B, T, d) -> gate, up (B, T, ffn). infer.quant swaps in a fused subclass."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.gate_up(x)
        h = swiglu(gate, up, impl=self.cfg.kernels)                        # (B, T, ffn)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, doc_ids=None, rows=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, doc_ids, rows)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)       # (max_seq_len, hd/2) fp32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                is_resid = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(m.weight, mean=0.0, std=resid_std if is_resid else std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_tables(self.config, self.config.max_seq_len, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def set_kernels(self, impl: str) -> None:
        """The one kernel switch: auto | torch | triton | liger."""
        self.config.kernels = impl
        self.config.validate()

    def num_params(self) -> int:
        """Unique parameters (a tied LM head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12*L*d*T (see model.flops)."""
        return flops_per_token(self.config, seq_len)

    def matmul_params(self) -> int:
        return matmul_params(self.config)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, p.device, dtype or p.dtype)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, doc_ids=None,
                      row_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) int64 -> final-norm hidden states (B, T, d). doc_ids: see forward.
        row_pos: optional (B,) int64, each row's own start position in `cache` (continuous batching: the
        cache's first B rows hold sequences of different lengths); `cache.pos` is then neither read nor moved."""
        B, T = idx.shape
        if row_pos is not None:
            return self._hidden_states_rows(idx, cache, row_pos)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} requested")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd/2)
        x = self.embed(idx)                                                        # (B, T, d)
        for block in self.layers:
            x = block(x, cos, sin, cache, doc_ids)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def _hidden_states_rows(self, idx: torch.Tensor, cache: KVCache, row_pos: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        p = row_pos.to(idx.device)[:, None] + torch.arange(T, device=idx.device)     # (B, T) positions
        Tk = int(p.max()) + 1
        if Tk > min(self.config.max_seq_len, cache.max_len):
            raise ValueError(f"row positions up to {Tk} exceed the cache ({cache.max_len}) or max_seq_len")
        cos, sin = self.rope_cos[p], self.rope_sin[p]                                # (B, T, hd/2)
        mask = p[:, None, :, None] >= torch.arange(Tk, device=idx.device)            # (B, 1, T, Tk)
        x = self.embed(idx)                                                          # (B, T, d)
        for block in self.layers:
            x = block(x, cos, sin, cache, None, (p, mask))
        return self.norm(x)

    def forward(self, idx, targets=None, cache: KVCache | None = None, z_loss: float = 0.0,
                ignore_index: int = -100, return_logits: bool = False, doc_ids=None, return_hidden: bool = False):
        """idx: (B, T) token ids; targets: (B, T) or None; doc_ids: optional (B, T) ids of packed
        documents (SFT packing): attention never crosses a document boundary. RoPE is relative, so
        a document sees the same relative positions wherever it is packed; no position reset needed.
        Returns (logits (B, T, V) or None, loss scalar or None). With targets the loss goes through
        the fused linear + cross-entropy path and logits are None unless return_logits=True.
        return_hidden=True returns (final-norm hidden states (B, T, d), None) instead: a loss that applies
        the LM head itself, chunked (distillation: kernels/fused_linear_distill.py)."""
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed training batches) cannot be combined with a KV cache")
        h = self.hidden_states(idx, cache, doc_ids)                                # (B, T, d)
        if return_hidden:
            return h, None
        if targets is None:
            return self.lm_head(h), None
        impl = self.config.kernels
        if return_logits:
            logits = self.lm_head(h)                                               # (B, T, V)
            loss = cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index, z_loss, impl=impl)
            return logits, loss
        loss = fused_linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                                  ignore_index, z_loss, impl=impl)
        return None, loss
