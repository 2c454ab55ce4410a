"""Crash-state enumeration: every state a power cut can leave, recovered and checked."""
