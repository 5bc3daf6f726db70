"""The decoupled pipeline: one Ray worker group per stage, DeepSpeed inside each, activations streamed forward."""
