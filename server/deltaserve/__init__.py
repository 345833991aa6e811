"""deltaserve: one resident base model, many fine-tuned tenants served as compressed deltas."""

__version__ = "0.1.0"
