"""Llama-family model forward and checkpoint loading."""
