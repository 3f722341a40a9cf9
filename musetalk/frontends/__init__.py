"""Front ends over the one pipeline: the CLI, the HTTP server, batch runs, evaluation, notebook helpers."""
