"""What a run measures about itself: memory, time split, metrics files."""
