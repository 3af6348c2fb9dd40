"""covenant.models: the Llama-style model on megatron-core and its parallel layout."""
