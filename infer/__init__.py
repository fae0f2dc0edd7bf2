"""Furnace infer package."""
