"""Cache capacity from the NN's memory need: ``capacity = (budget - NN need) // row_bytes``.

A ranker's memory budget holds its row cache *and* the activations of the
model it runs (the paper sizes the embedding cache as what the NN leaves
free).  The NN's need grows with the batch: ``sample_bytes`` per sample,
declared by the model (:attr:`flexemr.apps.dlrm.DLRM.activation_bytes_per_sample`).
:class:`ActivationCapacity` estimates it from a sliding window of recent
batch sizes::

    nn_need  = sample_bytes * max(samples of the last `window` batches)
    capacity = clamp((budget - nn_need) // row_bytes, min_capacity, budget // row_bytes)

``max`` over the window (not the mean) gives memory back to the NN as soon as
a large batch arrives and takes it again only once that batch has left the
window (hysteresis: no oscillation).  An empty window (idle, :meth:`reset`)
means no NN need.

>>> ac = ActivationCapacity(memory_budget_bytes=10_000, row_bytes=100, sample_bytes=20, window=2)
>>> ac.capacity, ac.observe(200), ac.observe(50), ac.observe(50)
(100, 60, 60, 90)
"""

from __future__ import annotations

from .cache import AdaptiveCapacity
from .errors import ConfigError
from .spec import _is_int

__all__ = ["ActivationCapacity"]


class ActivationCapacity(AdaptiveCapacity):
    """Cache rows left by the NN's activations (module docstring): an
    :class:`~flexemr.core.cache.AdaptiveCapacity` whose window holds batch sizes in samples and whose
    need is the NN's, not the staging buffers'; :meth:`observe` takes a batch's samples."""

    _observed = "samples"

    def __init__(self, memory_budget_bytes: int, row_bytes: int, sample_bytes: int, window: int = 16, *,
                 min_capacity: int = 0) -> None:
        for name, v, lo in (("memory_budget_bytes", memory_budget_bytes, 0), ("row_bytes", row_bytes, 1),
                            ("sample_bytes", sample_bytes, 1)):
            if not _is_int(v) or v < lo:  # in the order they are given; the rest are checked by the base
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        super().__init__(memory_budget_bytes, row_bytes, window, min_capacity=min_capacity)
        self.sample_bytes = int(sample_bytes)

    @property
    def nn_bytes(self) -> int:
        """The NN's estimated memory need: ``sample_bytes * max(window)``."""
        return self.sample_bytes * (max(self._window) if self._window else 0)

    @property
    def load_estimate(self) -> int:
        """What the budget holds besides the cache: :attr:`nn_bytes`."""
        return self.nn_bytes

    def observe(self, samples: int) -> int:
        """Record a batch of ``samples`` samples; returns the new :attr:`capacity`."""
        return super().observe(samples)

    def reset(self) -> None:
        """Forget the window (idle): the capacity returns to the whole budget."""
        super().reset()
