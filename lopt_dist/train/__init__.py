"""Training loops that run in one process, and the optimizer and schedule every path shares."""
