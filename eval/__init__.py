"""Benchmarks and reports: ShapesWorld, GenEval-style, DenseAlignBench-style, hacking monitors."""
