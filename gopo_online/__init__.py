"""gopo-online: simulator-driven online RL for two-agent task-oriented dialogue."""

__version__ = "0.1.0"
