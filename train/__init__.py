"""Furnace train package."""
