"""Routing policies: pure functions that rank a route's candidates."""
