"""Loads this folder's JSON lines for the local lm-eval tasks (referenced from the YAMLs with !function)."""
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_mc(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / "furnace_local_mc.jsonl"))})


def load_gen(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / "furnace_local_gen.jsonl"))})
