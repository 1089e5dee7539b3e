"""rmserve models: the reward model (trimmed SFT backbone + scalar head), its formatting and its trainer.

This package imports torch and transformers only; it never imports the service.
"""
