"""Pictures of attention (placeholder; being written)."""
