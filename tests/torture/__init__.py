"""Long and hostile runs: faults, fuzzers, load, memory bounds."""
