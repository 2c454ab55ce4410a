"""Tests of csnap_transport: the message stream over in-memory trio streams."""
