"""Precision decided once at start-up, with one line saying what runs and why.

FP8 backends, in order for --fp8-backend auto:
  TransformerEngine: te.Linear under fp8_autocast, DelayedScaling HYBRID (E4M3 fwd, E5M2 bwd),
    amax history 16 (as Elite-112M); needs CUDA with compute capability >= 8.9. On data-centre Blackwell
    (cc 10.x) MXFP8BlockScaling is tried first (TE >= 2.0; needs dims multiples of 32), DelayedScaling if
    its probe fails.
  torchao float8 training: dynamic tensorwise scaling; also runs on CPU (torch._scaled_mm).
  else BF16 (or the --dtype given), said in one line; --fp8-strict turns the fallback into an error.
Only the transformer blocks' Linear layers are converted; embeddings, LM head, norms and the loss stay
in high precision, and layers whose dimensions are not multiples of 16 stay BF16 (logged).
"""
from __future__ import annotations

import contextlib
import logging
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if not name:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise FurnaceError("--dtype fp16 is not supported on CPU: use bf16 or fp32")
    return DTYPES[name]


def fp8_linear_filter(name: str, module: torch.nn.Module, multiple: int = 16) -> bool:
    """FP8 only for Linear layers inside the transformer blocks with dims divisible by `multiple`
    (16 for tensor-scaled FP8, 32 for MXFP8's 32-element blocks)."""
    return (isinstance(module, torch.nn.Linear) and name.startswith("layers.")
            and module.in_features % multiple == 0 and module.out_features % multiple == 0)


def _te_status(device: torch.device) -> str:
    """'' when TransformerEngine can run here, else the reason it cannot."""
    if device.type != "cuda":
        return "TransformerEngine needs CUDA"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        return f"GPU compute capability {cc[0]}.{cc[1]} < 8.9 has no FP8"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken build
        return f"TransformerEngine not importable ({type(e).__name__}: {str(e)[:80]})"
    return ""


def _torchao_status() -> str:
    """'' when torchao's float8 training imports, else why not. Its known, harmless import noise is silenced
    during the import only: optional CUDA extensions that fail to load without them ("Failed to load
    ..._C_mxfp8...so": float8 training does not use them) and torch's pytree deprecation notice about its Enum
    registration; the precision line says which FP8 path runs."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as e:
        return f"torchao float8 not importable ({type(e).__name__}: {str(e)[:80]})"
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
    lin = torch.nn.Sequential()
    lin.add_module("layers", torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)))
    lin = lin.to(device)
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
    """Swap eligible Linear layers for the FP8 backend's; returns the converted names."""
    if not prec.fp8:
        return []
    mult = 32 if type(prec.te_recipe).__name__ == "MXFP8BlockScaling" else 16  # MXFP8: 32-element blocks
    names = [n for n, m in model.named_modules() if fp8_linear_filter(n, m, mult)]
    skipped = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("layers.") and n not in names]
    if skipped:
        log.info(f"FP8: {len(skipped)} layers stay high precision (dims not multiples of {mult}): {skipped[:4]}")
    if prec.fp8 == "torchao":
        from torchao.float8 import convert_to_float8_training
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fp8_linear_filter(fqn, m))
    else:
        import transformer_engine.pytorch as te
        for n in names:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            new = te.Linear(old.in_features, old.out_features, bias=False, params_dtype=old.weight.dtype,
                            device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            setattr(parent, child, new)
    prec.converted = names
    return names


def decide_precision(device: torch.device, dtype_name: str, fp8: bool, backend: str, strict: bool) -> Precision:
    """Decide once; log one line with the reason."""
    dtype = resolve_dtype(dtype_name, device)
    if not fp8:
        p = Precision(dtype=dtype, reason="FP8 not requested")
        log.info(f"precision: {p.name} ({p.reason})")
        return p
    reasons = []
    order = {"auto": ["te", "torchao"], "te": ["te"], "torchao": ["torchao"]}[backend]
    for b in order:
        why = _te_status(device) if b == "te" else _torchao_status()
        for rec in (_te_recipes(device) if b == "te" and not why else [None]):
            why = why or _probe(b, device, dtype, rec)
            if not why:
                p = Precision(dtype=dtype, fp8=b, te_recipe=rec, reason="probe passed")
                what = f"TransformerEngine {type(rec).__name__}" if b == "te" else "torchao float8"
                log.info(f"precision: FP8 via {what} (activations/master weights {p.dtype}; {p.reason})")
                return p
            if rec is not None and type(rec).__name__ == "MXFP8BlockScaling":
                log.info(f"FP8: TransformerEngine MXFP8 unavailable ({why}); trying DelayedScaling")
                why = ""
        reasons.append(f"{b}: {why}")
    msg = "; ".join(reasons)
    if strict:
        raise FurnaceError(f"--fp8-strict: FP8 is not available here ({msg})")
    p = Precision(dtype=dtype if dtype != torch.float32 or device.type == "cpu" else torch.bfloat16,
                  reason=f"FP8 unavailable: {msg}")
    log.info(f"precision: {p.name} ({p.reason})")
    return p
