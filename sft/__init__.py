"""Fine-tuning methods on the one Trainer: SFT (assistant-only loss, packing with document masking) and DPO
(cached reference log-probs).

    from sft import build_sft_example, dpo_loss
    ids, labels = build_sft_example(tokenizer, messages, max_len=512)
Commands: sft/train_sft.py, sft/train_dpo.py; what they share: sft/common.py. Names are imported lazily
(PEP 562) so the commands' `--help` does not import torch.
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
