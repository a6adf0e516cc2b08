"""A Broadcastify-compatible feed simulator: demo mode, and the service the tests talk to."""
