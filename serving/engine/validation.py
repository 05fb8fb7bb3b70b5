"""Checks an engine makes of what it is given.

Each raises with a message that says what to change. They are plain functions of numbers so that
every place that must refuse the same thing (the engine core, and the API layer before anything
is sent to an instance) refuses it with the same words.
"""
from __future__ import annotations

from serving.engine.protocol import RequestRejectedError


def check_stop_token_ids(stop_token_ids: list[int], vocab_size: int) -> None:
    """RequestRejectedError (a 400) unless every stop token id is in [0, vocab_size).

    An id outside the vocabulary can never be sampled, so the stop would never happen; and on the
    wire to an instance (uint32) a negative or huge id does not even serialise."""
    bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejectedError(f"stop_token_ids contains {bad[0]}, which is outside the vocabulary "
                                   f"(valid ids are 0..{vocab_size - 1}); remove it")
