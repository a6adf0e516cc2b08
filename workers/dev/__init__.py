"""Development tools: throwaway Redis and PostgreSQL servers, the Broadcastify feed simulator
(demo mode, tests and benches), and the aiohttp server on a background thread that the
simulator and the tests' fake services run on (http_server)."""
