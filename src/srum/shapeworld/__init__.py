"""ShapeWorld: the embedded default world where the whole SRUM loop runs on a CPU and is measured exactly."""
