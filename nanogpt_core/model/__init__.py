"""The GPT model: its shape, layers, KV cache, Hugging Face conversion."""
