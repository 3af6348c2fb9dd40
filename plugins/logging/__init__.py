"""The built-in metrics consumers: ``console``, ``jsonl`` and ``wandb``.

Every component reports through the ``covenant_log_metrics`` hook; these three plugins consume
it. Each is its own plugin module with its own entry point and config section, so any one of
them can be turned off (``[plugins] enable`` / ``COVENANT_PLUGINS``) without touching training:

* :mod:`covenant.plugins.logging.console` -- a rich progress bar and an evaluation table;
* :mod:`covenant.plugins.logging.jsonl` -- ``metrics.jsonl`` in the run directory, the source
  for reports (read it back with :func:`covenant.plugins.logging.jsonl.read_metrics`);
* :mod:`covenant.plugins.logging.wandb_plugin` -- Weights & Biases, offline by default.

:mod:`covenant.plugins.logging.common` holds what they share (the failure guard, the rank
check); it is a helper module, not a plugin. See docs/logging.md.
"""
