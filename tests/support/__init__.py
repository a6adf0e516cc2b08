"""Helpers only the tests use: the session's servers, fixtures of the ingestion tests, audio
calls, workers and checks, transcription workers and dispatching by hand, parts of a worker's
environment several stages set alike, the Celery app with test jobs, and starting workers of
that app. What the benches use too lives in workers/dev/ (processes, the whole pipeline, calls
and audio)."""
