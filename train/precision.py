"""Precision decided once at start-up, with one line saying what runs and why.

FP8 backends, in order for --fp8-backend auto, each after a tiny probe: TransformerEngine (te.Linear under
fp8_autocast, DelayedScaling HYBRID: E4M3 forward, E5M2 backward, amax history 16 as Elite-112M; needs CUDA with
compute capability >= 8.9), then torchao float8 training (dynamic tensorwise scaling; also runs on CPU through
torch._scaled_mm), else BF16 (or the --dtype given); --fp8-strict turns that fallback into an error. Only the
transformer blocks' Linear layers are converted: embeddings, LM head, norms and the loss stay in high precision.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kernels.common import FurnaceError

log = logging.getLogger("furnace")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Precision:
    dtype: torch.dtype                 # autocast dtype (fp32 = no autocast)
    fp8: str = ""                      # "", "te" or "torchao"
    reason: str = ""                   # why this precision (one line)
    te_recipe: object = None
    converted: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"fp8-{self.fp8}" if self.fp8 else {v: k for k, v in DTYPES.items()}[self.dtype]

    def autocast(self, device_type: str):
        """Context for the forward pass: bf16/fp16 autocast, plus TE's fp8_autocast when TE is used."""
        stack = contextlib.ExitStack()
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=device_type, dtype=self.dtype))
        if self.fp8 == "te":
            import transformer_engine.pytorch as te
            stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=self.te_recipe))
        return stack


def resolve_device(name: str) -> torch.device:
    """--device auto | cpu | cuda | cuda:N, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FurnaceError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FurnaceError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def _unavailable(backend: str, device: torch.device) -> str:
    """'' when the FP8 backend ("te" or "torchao") can run here, else why not. torchao's known, harmless import
    noise is silenced during the import only: optional CUDA extensions that fail to load without them ("Failed
    to load ..._C_mxfp8...so": float8 training does not use them) and torch's pytree deprecation notice about
    its Enum registration; the precision line says which FP8 path runs."""
    if backend == "te" and device.type != "cuda":
        return "TransformerEngine needs CUDA"
    if backend == "te" and torch.cuda.get_device_capability(device) < (8, 9):
        return "GPU compute capability {}.{} < 8.9 has no FP8".format(*torch.cuda.get_device_capability(device))
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if backend == "te":
            import transformer_engine.pytorch  # noqa: F401
        else:
            from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as e:  # ImportError, or a broken build
        what = "TransformerEngine" if backend == "te" else "torchao float8"
        return f"{what} not importable ({type(e).__name__}: {str(e)[:80]})"
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
    return ""


def _te_recipes(device: torch.device) -> list:
    """TE recipes to try, best first: MXFP8 on data-centre Blackwell (cc 10.x) when this TE has it, then
    DelayedScaling (the Elite-112M recipe, also kept on consumer Blackwell cc 12.x for comparability)."""
    from transformer_engine.common import recipe
    out = []
    if torch.cuda.get_device_capability(device)[0] == 10 and hasattr(recipe, "MXFP8BlockScaling"):
        out.append(recipe.MXFP8BlockScaling())
    out.append(recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"))
    return out


def _probe(backend: str, device: torch.device, dtype: torch.dtype, te_recipe=None) -> str:
    """Tiny FP8 forward/backward; '' if it works, else the reason. Shapes are multiples of 32 (MXFP8)."""
    lin = torch.nn.Sequential(OrderedDict(layers=torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)))).to(device)
    try:
        prec = Precision(dtype=dtype, fp8=backend, te_recipe=te_recipe)
        convert_linears(lin, prec)
        x = torch.randn(32, 64, device=device, requires_grad=True)  # (M, K): M, K multiples of 32
        with prec.autocast(device.type):
            y = lin(x)
        y.float().sum().backward()
        if not torch.isfinite(x.grad).all():
            return "probe gave non-finite gradients"
    except Exception as e:  # any failure of the backend on this hardware means: do not use it
        return f"probe failed ({type(e).__name__}: {str(e)[:100]})"
    return ""


def convert_linears(model: torch.nn.Module, prec: Precision) -> list[str]:
    """Swap the transformer blocks' Linear layers whose dims are multiples of 16 (32 for MXFP8's 32-element
    blocks) for the FP8 backend's; returns the converted names."""
    if not prec.fp8:
        return []
    mult = 32 if type(prec.te_recipe).__name__ == "MXFP8BlockScaling" else 16
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")}
    names = [n for n, m in linears.items() if m.in_features % mult == 0 and m.out_features % mult == 0]
    skipped = [n for n in linears if n not in names]
    if skipped:
        log.info(f"FP8: {len(skipped)} layers stay high precision (dims not multiples of {mult}): {skipped[:4]}")
    if prec.fp8 == "torchao":
        from torchao.float8 import convert_to_float8_training
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in names)
    else:
        import transformer_engine.pytorch as te
        for n in names:
            old = linears[n]
            new = te.Linear(old.in_features, old.out_features, bias=False, params_dtype=old.weight.dtype,
                            device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            model.set_submodule(n, new)
    prec.converted = names
    return names


def decide_precision(device: torch.device, dtype_name: str, fp8: bool, backend: str, strict: bool) -> Precision:
    """Decide once; log one line with the reason."""
    if dtype_name == "fp16" and device.type == "cpu":
        raise FurnaceError("--dtype fp16 is not supported on CPU: use bf16 or fp32")
    dtype = DTYPES[dtype_name] if dtype_name else torch.bfloat16 if device.type == "cuda" else torch.float32
    reasons = []
    for b in ({"auto": ["te", "torchao"]}.get(backend, [backend]) if fp8 else []):
        why = _unavailable(b, device)
        for rec in (_te_recipes(device) if b == "te" and not why else [None]):
            why = why or _probe(b, device, dtype, rec)
            if not why:
                what = f"TransformerEngine {type(rec).__name__}" if b == "te" else "torchao float8"
                log.info(f"precision: FP8 via {what} (activations/master weights {dtype}; probe passed)")
                return Precision(dtype=dtype, fp8=b, te_recipe=rec, reason="probe passed")
            if type(rec).__name__ == "MXFP8BlockScaling":
                log.info(f"FP8: TransformerEngine MXFP8 unavailable ({why}); trying DelayedScaling")
                why = ""
        reasons.append(f"{b}: {why}")
    p = Precision(dtype=dtype, reason="FP8 not requested")
    if reasons:
        if strict:
            raise FurnaceError(f"--fp8-strict: FP8 is not available here ({'; '.join(reasons)})")
        p = Precision(dtype=dtype if dtype != torch.float32 or device.type == "cpu" else torch.bfloat16,
                      reason=f"FP8 unavailable: {'; '.join(reasons)}")
    log.info(f"precision: {p.name} ({p.reason})")
    return p
