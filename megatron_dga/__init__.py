"""megatron-dga: Dynamic Gradient Alignment (arXiv 2410.02498) on megatron-core."""

__version__ = "0.1.0"
