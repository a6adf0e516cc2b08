"""workers/core: settings, locks, the periodic-job machinery and beat (singletons, time
limits, clock skew), migrations and the schema, and children that never outlive their parent."""
