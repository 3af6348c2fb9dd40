"""covenant.engine: the core. It names no plugin; plugins attach through hooks (hookspecs.py)."""
