"""Benchmark readers, official metrics and test-server submission files for FashionIQ, CIRR and CIRCO."""
