"""``trainfleet bench``: the parallel strategies and precisions compared on the user's model."""
