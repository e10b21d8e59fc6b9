class EngineError(RuntimeError):
    """A model that cannot run as asked; the message names the problem and the fix."""
