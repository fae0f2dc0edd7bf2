"""Furnace data package."""
