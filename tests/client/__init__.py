"""Tests of the client library on its own: sessions against scripted servers."""
