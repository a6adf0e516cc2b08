"""The machinery every process shares: settings, the runtime of a pool process (event loop,
database pool, HTTP client), periodic jobs and their singleton locks, a process's identity (who
holds a lock or a claim), the clock, migrations, the command lines of our processes and their
lifetime, the all-time counters, the row a statement always returns, and the small parsers and
text helpers for outside input."""
