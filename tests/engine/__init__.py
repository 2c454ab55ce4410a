"""Tests of the synchronous store engine."""
