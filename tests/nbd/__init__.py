"""Tests of the NBD gateway, with real NBD clients and raw ones."""
