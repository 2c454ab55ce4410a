"""Tests of csnapd: the dispatcher in-process and the server over real sockets."""
