"""The low-rank family: LoRA and its relatives, each built on :mod:`.base`."""
