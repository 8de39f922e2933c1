"""Training of the demo EMO (kept apart from the serving path: nothing in server/ imports it)."""
