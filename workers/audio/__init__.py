"""Call audio: safe downloads, decoding and conversion, the prepared file's checks, and the
store that keeps the files."""
