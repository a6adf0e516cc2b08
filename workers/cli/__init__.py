"""The `bcfy` command: one module per command group (main.py parses and dispatches; `run` is
the whole pipeline on one machine). Commands use the machinery; nothing imports a command."""
