"""The coordinator: Flower ServerApp, aggregation, checkpoints and run records."""
