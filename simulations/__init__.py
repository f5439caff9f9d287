"""Researcher entry points: N simulated sites on one machine through Flower's simulation engine."""
