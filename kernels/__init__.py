"""Triton kernels and their launchers (no autograd here). Installed as revglow.kernels."""
