"""Built-in tokenizer plugins: ``char``, ``gpt2`` and ``huggingface``."""
