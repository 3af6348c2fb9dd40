"""covenant.plugins: built-in plugins, each a package registered through the same entry points as third-party ones."""
