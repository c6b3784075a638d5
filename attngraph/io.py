"""Saving and loading graphs and weights (placeholder until the serialization lands)."""
