"""Soft prompts: prompt tuning, prefix tuning and P-tuning, acting on a transformers body."""
