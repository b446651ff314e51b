"""Start-up: configuration, create_server/serve, the worker supervisor and the CLI."""
