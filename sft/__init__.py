"""Fine-tuning: SFT (assistant-only loss, packing with document masking) and DPO (cached reference log-probs).

    from sft import build_sft_example, dpo_loss
    ids, labels = build_sft_example(tokenizer, messages, max_len=512)
CLIs: sft/train_sft.py, sft/train_dpo.py; jobs: sft/finetune.py.
"""
from sft.dpo import PairLoader, dpo_loss, reference_logps, sequence_logps
from sft.examples import IGNORE, ExampleTooLong, build_sft_example
from sft.formats import BadRecords, dpo_messages, sft_messages
from sft.packing import PackedSFTLoader, pack_row

__all__ = ["build_sft_example", "ExampleTooLong", "IGNORE", "dpo_loss", "sequence_logps", "reference_logps",
           "PairLoader", "PackedSFTLoader", "pack_row", "sft_messages", "dpo_messages", "BadRecords"]
