"""Checkpoint converters between megatron-dga and other formats (``hf``: Hugging Face)."""
