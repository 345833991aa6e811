"""Layers that apply tenant deltas at request time."""
