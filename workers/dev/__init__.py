"""Development tools: throwaway Redis and PostgreSQL servers, and the Broadcastify feed
simulator (demo mode, tests and benches)."""
