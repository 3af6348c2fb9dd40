"""The DDP baseline: no outer step; gradients averaged across peers at every inner step.

A comparison baseline for the in-process convergence study and trusted clusters, miner-only
(see :mod:`covenant.plugins.ddp.outer` and docs/outer.md).
"""
