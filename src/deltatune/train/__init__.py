"""The training/evaluation harness: tasks, metrics, models, loop, CLI."""
