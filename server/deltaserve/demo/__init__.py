"""`deltaserve demo`: base import, tenant fine-tunes, bitdelta compression, live multi-tenant serving."""
