"""Built-in TOML configs, shipped inside the package (``--config tiny`` finds them)."""
