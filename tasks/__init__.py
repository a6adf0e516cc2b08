"""The jobs, one package per stage (ingest, audio, transcription, geo, maintenance). Each
package's `__init__` says what belongs there and imports its `jobs` module, which declares the
stage's Celery tasks under their fixed names ("tasks.<stage>.<job>")."""
