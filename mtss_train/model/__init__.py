"""The network: the slim trunk, the multi-task model over it, the lasso, colour space."""
