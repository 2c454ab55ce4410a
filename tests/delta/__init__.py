"""Tests of csnap_delta: the delta file layout, and applying deltas."""
