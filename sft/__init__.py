"""Furnace sft package."""
