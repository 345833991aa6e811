"""Fidelity evaluation of delta codecs on tenant fine-tunes, run through the engine."""
