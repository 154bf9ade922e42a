"""Evaluation of learned representations: linear probe, feature export, comparisons."""
