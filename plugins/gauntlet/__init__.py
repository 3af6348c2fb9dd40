"""The Gauntlet validator (SPEC section 7): checks, loss scores, OpenSkill ratings, copy detection,
slashing, incentive weights and peer lists.

``rules`` holds the scoring rules as pure functions (no I/O, no globals), ``scoring`` the
per-window state machine built from them, and ``plugin`` the validator process that measures
what the rules consume (fetches, checks, losses) and publishes what they produce.
"""
