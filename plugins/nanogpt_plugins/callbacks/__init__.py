"""Built-in callback plugins."""
