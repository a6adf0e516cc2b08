"""Clients of the services outside the pipeline (the Broadcastify Calls API), and what they
share about HTTP (what a status means, Retry-After)."""
