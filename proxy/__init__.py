"""Understudy proxy: an OpenAI-compatible endpoint that records tool-use trajectories."""
