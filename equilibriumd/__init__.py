"""Equilibrium: game-theoretic, latency-aware load balancing with an eBPF datapath."""

__version__ = "0.1.0"
