"""Benchmarks, run by hand: `bench/ingest`, `bench/memory` (see the README's Performance section)."""
