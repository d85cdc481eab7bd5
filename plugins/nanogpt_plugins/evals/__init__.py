"""Built-in evaluation tasks."""
