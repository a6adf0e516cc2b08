"""Helpers only the tests use: the session's servers, fixtures of the ingestion tests, audio
calls and checks, the Celery app with test jobs, and starting workers of that app. What the
benches use too lives in workers/dev/ (processes, the whole pipeline, calls and audio)."""
