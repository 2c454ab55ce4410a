"""Tests of the sans-IO protocol codec."""
