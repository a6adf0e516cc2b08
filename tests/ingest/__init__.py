"""tasks/ingest: the live poll and its cursor, back-fill, record validation and storage,
the key hold, the ingestion settings, and the jobs in a real worker."""
