"""Running the app under uvicorn, with the server's own answer to SIGINT/SIGTERM.

The first signal stops new requests (503) and answers the waiting ones 503; the running generation finishes
and its client gets its image, then the process exits. A second signal cancels the running generation too: its
client is answered 503 at once and the generation stops at its next step. A third exits without waiting.
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
        self.stepwise.begin_shutdown(cancel_running=self.signals > 1)
        self.should_exit = True
        if self.signals > 2:
            self.force_exit = True


def run(app, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; returns once the server has shut down cleanly."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
    server = StepwiseServer(config, app.state.stepwise)
    server.run()
