"""The chain plugin: the local SQLite chain and the Bittensor SDK client behind one interface.

See :mod:`covenant.plugins.chain.plugin` for the hooks and docs/chain.md for the user guide.
"""
