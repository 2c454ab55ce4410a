"""End-to-end tests with real csnapd, csnap-agent and csnap-nbd processes."""
