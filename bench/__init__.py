"""Furnace bench package."""
