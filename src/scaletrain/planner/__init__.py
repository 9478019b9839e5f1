"""Planner: per-GPU memory, communication and step-time predictions for every
parallel layout, the search for the best one, and their proof against
measured runs. Pure Python: no process groups."""
