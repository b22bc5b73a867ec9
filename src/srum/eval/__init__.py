"""Benchmarks behind ``srum validate``: images for T2I-CompBench and GenEval prompts, the official SRUM judge
protocol for T2I-CompBench, a multiple-choice understanding check, and JSON reports that compare across runs."""
