"""The runtime: the lifecycle verbs and what runs an adapted model.

``core`` (inject, merge, unload, disabled, route, delete), the generic ``wrapper`` every adapted
module becomes and its batched ``routing``; ``state`` (an adapter's tensors and parameter report),
``compose`` (combine, reconfigure), ``stepping`` (the step hooks), ``regional`` (compile),
``loraplus`` (optimizer groups), ``checks``, ``fingerprint`` (which base an adapter belongs to),
``quant`` and ``quantized_base`` (a 4-bit NF4 base), ``estimate`` (what a step will cost).

It imports the contract and, for the 4-bit base alone, the low-rank methods; no method imports it.
"""
