"""tasks/maintenance: retention, what is pruned after which setting, and the files with it."""
