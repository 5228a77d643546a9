"""Adaptive hybrid-PEFT Mamba."""
