"""Experiment files: the option tables, reading TOML, --set overrides, plugin options."""
