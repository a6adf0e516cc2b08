"""tasks/audio and workers/audio: claims, download (and its address checks), preparation,
the store, and the audio workers through outages, retries, lost workers and shutdowns."""
