"""Lesson 04: loading a model in 4 bits (and the demo's conversion), the kernels training uses, and generation."""
