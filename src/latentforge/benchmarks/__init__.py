"""Benchmarks behind `latentforge bench NAME`; each module has main(argv) -> int."""
