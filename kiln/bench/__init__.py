"""`kiln bench`: benchmarks that print a table and write JSON (+ a PNG plot)."""
