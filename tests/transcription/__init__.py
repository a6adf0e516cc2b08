"""tasks/transcription and workers/recognizers: dispatch, claims, the backends, search, the
workers and their promises (fake_openai: a local OpenAI-compatible service)."""
