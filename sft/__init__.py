"""Fine-tuning methods on the one Trainer (SFT, DPO, GRPO, distillation; sft/README.md). The names below are
imported lazily (PEP 562) so the commands' `--help` does not import torch.
"""
import importlib

_EXPORTS = {"PairLoader": "sft.dpo", "dpo_loss": "sft.dpo", "reference_logps": "sft.dpo", "sequence_logps": "sft.dpo",
            "IGNORE": "sft.examples", "ExampleTooLong": "sft.examples", "build_sft_example": "sft.examples",
            "BadRecords": "sft.formats", "dpo_messages": "sft.formats", "sft_messages": "sft.formats",
            "PackedSFTLoader": "sft.packing", "pack_row": "sft.packing"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sft' has no attribute {name!r}")
