"""One module per `loopus` verb; each defines `register(subparsers)` and sets `handler`."""
