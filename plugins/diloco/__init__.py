"""The DiLoCo baseline: dense pseudo-gradients, averaged, outer SGD with Nesterov momentum.

See :mod:`covenant.plugins.diloco.plugin` for the hooks, :mod:`.outer` for the outer step,
:mod:`.codec` for the ``dense/1`` wire format and docs/outer.md for the user guide.
"""
