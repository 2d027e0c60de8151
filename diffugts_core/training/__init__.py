"""Training code: the recipes that train the small heads once and reuse them."""
