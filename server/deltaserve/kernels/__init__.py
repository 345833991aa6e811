"""Multi-tenant delta kernels: plain-torch references, a CPU fast path and Triton GPU kernels."""
