"""Synthetic evaluation tasks with exact answers (see `shapes`)."""
