"""``stepwise serve``: a long-lived server that keeps the models loaded and speaks AUTOMATIC1111's and OpenAI's
image APIs (serve/app.py). Needs the ``serve`` extra (FastAPI, uvicorn); nothing here is imported by the
runtime or the CLI until ``serve`` runs."""
