"""Data: sources and tokenizers, preparing token and example data, training batches."""
