"""The ``adversaries`` plugin: miners that misbehave on purpose, to watch the Gauntlet catch them.

Enabled per miner by ``[adversaries] behaviour`` (``copier``, ``partial_copier``, ``wrong_data``,
``noise``, ``stale``, ``late``, ``invalid``, ``forged``, ``replayed``; ``none``, the default, is
an honest miner). :mod:`.plugin` holds the hooks, :mod:`.behaviours` what each behaviour does
and :mod:`.config` the ``[adversaries]`` section. Miner-only: a validator refuses it
(``COVENANT_ROLES``). See docs/adversaries.md.
"""
