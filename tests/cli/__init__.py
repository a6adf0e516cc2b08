"""workers/cli: the operator commands (operations, status, metrics, health, playlists),
what they print, and the secrets they never show."""
