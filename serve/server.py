"""Running the app under uvicorn, with the server's own answer to SIGINT/SIGTERM.

The first signal stops new requests (503) and drops the waiting ones; the running generation finishes and
its client gets its image, then the process exits. A second signal cancels the running generation too (it
stops at its next step) and exits at once.
"""

from __future__ import annotations

import uvicorn


class StepwiseServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.stepwise = state
        self.signals = 0

    def handle_exit(self, sig, frame) -> None:
        self.signals += 1
        second = self.signals > 1
        self.stepwise.begin_shutdown(cancel_running=second)
        super().handle_exit(sig, frame)
        if second:
            self.force_exit = True


def run(app, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; returns once the server has shut down cleanly."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
    server = StepwiseServer(config, app.state.stepwise)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the captured signal again once it has shut down
        pass
