"""The engine's commands: one module each, with `register(subparsers)`; `smoothcert.cli`
assembles them."""
