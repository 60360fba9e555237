"""Hypothesis settings for the game-engine suite only: no deadline (LPs vary
in time on a loaded CI machine), a bounded number of examples so the suite
stays fast, and derandomized so a run is reproducible."""

from hypothesis import settings

settings.register_profile("game", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("game")
