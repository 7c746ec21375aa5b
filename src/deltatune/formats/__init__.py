"""File formats: how adapters are read and written."""
