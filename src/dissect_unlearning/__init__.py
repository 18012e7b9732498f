"""Dissecting fine-tuning unlearning: an executable companion to Hong et al. (EMNLP 2024)."""
__version__ = "0.1.0"
