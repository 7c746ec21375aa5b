"""Selective methods: train a part of the model itself (biases, the last blocks)."""
