"""Ray-facing entry points: the job that `ray job submit` runs, and example cluster configurations."""
