"""``stepwise serve --ray``: the HTTP app as a Ray Serve deployment of N replicas, each building the app (and
loading its pipelines) once, each asking Ray for as many CPUs as ONNX Runtime runs threads.

To be wired to ``stepwise serve --ray --replicas N`` with ``serve/app.py``'s ``create_app(models, ...)`` once
that lands: ``deploy(create_app, models, replicas, threads)``. Ray Serve is imported here only (the ``ray``
extra).
"""

from __future__ import annotations

import inspect


def _deployment_class():
    from ray import serve

    @serve.ingress()  # late-bound: each replica builds its own app in __serve_build_asgi_app__
    class StepwiseServe:
        def __init__(self, factory, models, kwargs):
            self._factory, self._models, self._kwargs = factory, models, kwargs

        def __serve_build_asgi_app__(self):
            return self._factory(self._models, **self._kwargs)

    return StepwiseServe


def deploy(
    create_app_factory,
    models,
    replicas: int = 1,
    threads: int | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "stepwise",
    address: str | None = "auto",
    blocking: bool = False,
    **app_kwargs,
):
    """Deploy ``create_app_factory(models, threads=threads, **app_kwargs)`` (a FastAPI app factory; ``threads``
    is passed only when the factory takes it) as ``replicas`` Ray Serve replicas of ``threads`` CPUs each,
    served at http://HOST:PORT/. Joins (or starts) Ray as ``stepwise batch --ray`` does. Returns the handle;
    ``blocking`` serves until Ctrl-C."""
    from batch.ray_backend import connect

    connect(address)
    from ray import serve

    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1 (got {replicas})")
    kwargs = dict(app_kwargs)
    if "threads" in inspect.signature(create_app_factory).parameters:
        kwargs["threads"] = threads
    deployment = serve.deployment(
        _deployment_class(),
        name=name,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads or 1},
    )
    serve.start(http_options={"host": host, "port": port})
    return serve.run(
        deployment.bind(create_app_factory, models, kwargs), name=name, route_prefix="/", blocking=blocking
    )
