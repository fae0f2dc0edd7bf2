"""Attention backends: PyTorch SDPA (default) and flash-attn (CUDA, when installed).

The backend is chosen once per process and logged in one line.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kernels.common import log_once

log = logging.getLogger("furnace")


def _load_flash_attn():
    """flash_attn_func, or (None, reason). Resolved once, at import, on CUDA machines only, so that
    no import or logging happens inside a torch.compile'd forward."""
    if not torch.cuda.is_available():
        return None, "no CUDA"
    try:
        import flash_attn  # noqa: PLC0415
        from flash_attn import flash_attn_func  # noqa: PLC0415
    except Exception as e:  # ImportError, or an ABI error after a torch upgrade
        return None, f"flash-attn unavailable: {type(e).__name__}: {str(e)[:80]}"
    ver = tuple(int(x) for x in flash_attn.__version__.split(".")[:2] if x.isdigit())
    if ver < (2, 1):  # before 2.1 causal=True is top-left aligned: wrong for a KV cache (Tq < Tk)
        return None, f"flash-attn {flash_attn.__version__} < 2.1 (top-left causal mask)"
    return flash_attn_func, ""


_FLASH_ATTN, _FLASH_ATTN_WHY = _load_flash_attn()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     doc_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, Tq, H, hd); k, v: (B, Tk, Hkv, hd) with Tk >= Tq; query i sits at position Tk-Tq+i.
    doc_ids: optional (B, T) ids of the packed document each position belongs to (Tq == Tk): a query
    then attends only to earlier positions of its own document (document masking).
    attn_mask: optional (B, 1, Tq, Tk) bool, True = may attend, used instead of the causal rule (rows of a
    continuous batch sit at different positions).
    Returns (B, Tq, H, hd)."""
    B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if attn_mask is not None:
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)                          # (B, Hkv, Tk, hd)
        if Tq == 1:  # the grouped one-query form of the decode path below, with the mask broadcast over g
            qg = q.reshape(B, Hkv, H // Hkv, hd)                               # (B, Hkv, g, hd)
            return F.scaled_dot_product_attention(qg, kt, vt, attn_mask=attn_mask).reshape(B, 1, H, hd)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=attn_mask, enable_gqa=bool(Hkv != H))
        return y.transpose(1, 2)                                               # (B, Tq, H, hd)
    if doc_ids is not None:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, hd)
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]                  # (B, T, T)
        mask = (causal & same_doc)[:, None]                                    # (B, 1, T, T)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=bool(Hkv != H))
        return y.transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype:
        if _FLASH_ATTN is not None and hd % 8 == 0 and hd <= 256:  # flash-attn 2's head-dim limits
            log_once("attention: flash-attn")
            return _FLASH_ATTN(q, k, v, causal=True)  # bottom-right aligned causal mask, native GQA
    log_once(f"attention: SDPA ({_FLASH_ATTN_WHY or 'flash-attn needs bf16/fp16 CUDA q/k/v, head_dim % 8 == 0, <= 256'})")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, hd)
    gqa = bool(Hkv != H)  # SDPA shares each kv head among H // Hkv query heads (a bool, not a SymBool, under compile)
    if Tq == Tk:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    elif Tq == 1:
        # One query (decode) sees the whole cache. The H // Hkv query heads sharing a kv head go in as that
        # head's "positions": one plain SDPA over Hkv heads, no GQA broadcast (1.4x faster on CPU).
        qg = q.reshape(B, Hkv, H // Hkv, hd)                                  # (B, Hkv, g, hd)
        return F.scaled_dot_product_attention(qg, kt, vt).reshape(B, 1, H, hd)
    else:
        # Chunked prefill on top of a cache: bottom-right aligned causal mask.
        i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        j = torch.arange(Tk, device=q.device)[None, :]
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=j <= i, enable_gqa=gqa)  # mask (Tq, Tk)
    return y.transpose(1, 2)                                                   # (B, Tq, H, hd)
