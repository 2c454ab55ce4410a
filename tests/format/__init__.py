"""Tests of the on-disk format and mkcsnap."""
