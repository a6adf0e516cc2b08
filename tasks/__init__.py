"""One module per job: ingest, audio, transcription, geo."""
