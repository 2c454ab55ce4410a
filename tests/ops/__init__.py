"""Tests of what operators rely on: systemd notification, unit files, JSON logs."""
