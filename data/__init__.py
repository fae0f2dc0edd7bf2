"""Furnace data: tokenizers, llm.c-format token shards, `prepare` and the TokenLoader.

    from data import prepare, TokenLoader, load_tokenizer
    prepare("data/stdlib")                                    # default corpus, BPE train:4096
    loader = TokenLoader([("data/stdlib", 1.0)], batch_size=8, seq_len=1024)
    x, y = loader.next_batch()                                # int64 (8, 1024) each
"""
from data.build import prepare, read_manifest
from data.loader import TokenLoader, check_tokenizer_match, parse_data_arg
from data.shards import read_shard, write_shard
from data.sources import default_corpus_files
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_bpe

__all__ = ["Tokenizer", "load_tokenizer", "train_bpe", "SPECIAL_TOKENS", "write_shard", "read_shard", "prepare",
           "TokenLoader", "parse_data_arg", "read_manifest", "check_tokenizer_match", "default_corpus_files"]
