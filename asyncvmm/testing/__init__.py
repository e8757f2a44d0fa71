"""Helpers that play the guest's side, for tests and benchmarks of the device data paths."""
