"""Benchmarks, run by hand: `bench/ingest`, `bench/memory` (see docs/performance.md)."""
