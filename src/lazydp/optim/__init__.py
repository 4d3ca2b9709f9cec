"""The update side of the DP step: eager per-step noise and LazyDP's lazy noise."""
