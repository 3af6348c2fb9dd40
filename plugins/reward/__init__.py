"""The reward plugin: turns the validator's weights into chain weights (SPEC section 7)."""
