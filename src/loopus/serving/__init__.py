"""Talking to a model: the generation engine shared by `loopus chat` and `loopus serve`, and the HTTP app.

`engine` runs `model.generate` in a worker thread and streams each generated token with the loop
passes it used; `protocol` and `app` put an OpenAI-compatible FastAPI server on top of it.
Nothing is imported here, so `loopus --help` does not load torch.
"""
