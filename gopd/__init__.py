"""gopd: a lean trainer for Generalized On-Policy Distillation (G-OPD / ExOPD).

The trainer arrives with its own issue; the fused ops it builds on live in `gopd_kernels`.
"""

__version__ = "0.1.0.dev0"
