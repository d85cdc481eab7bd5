"""The plugin machinery: hook specifications, options, the registry and its loader."""
