"""Fixed weights over the bases: uniform, natural, importance sampling (weight 1 on the importance basis), a blend of
one basis with the uniform weights (the static frontier a mixer has to beat), or any."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..mixture import check_weights
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import Attachment, StrategyBase, setting_error


class StaticStrategy(StrategyBase):
    """Sets the stream's weights once (uniform by default, `weights`, or `share` on the basis named `basis` and the
    rest uniform over all the bases); they never change. Its state is empty: the stream saves the weights."""

    def __init__(self, stream: MixtureStream, *, weights: np.ndarray | list[float] | None = None,
                 basis: str | None = None, share: float = 1.0):
        names = stream.mixture.names
        uniform = np.full(len(names), 1 / len(names))
        if basis is not None:
            if basis not in names:
                raise ValueError(f"basis = '{basis}' is not among the stream's bases {names[:8]}...")
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"share = {share!r}: expected the basis's share of the weights, 0 <= share <= 1")
            weights = share * np.eye(len(names))[names.index(basis)] + (1.0 - share) * uniform
        self.stream = stream
        stream.set_weights(uniform if weights is None else weights)


@dataclass(frozen=True)
class Static:
    """Static mixing: uniform over the bases unless `weights` or `basis` says otherwise."""

    weights: tuple[float, ...] | None = setting(None, "one weight per basis (normalized), or None")
    basis: str | None = setting(None, "all the weight on this basis, e.g. 'importance' (importance sampling)")
    share: float = setting(1.0, "with basis: its share of the weights, the rest uniform over all the bases (a blend)")

    needs: ClassVar[frozenset[str]] = frozenset()

    def validate(self, section: str = "strategy") -> None:
        if self.weights is not None and self.basis is not None:
            raise setting_error(section, "basis", self.basis, "None when weights are given (one or the other)")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0.0 <= self.share <= 1.0:
            raise setting_error(section, "share", self.share, "a share of the weights, 0 <= share <= 1")
        if self.weights is not None:
            try:
                check_weights(list(self.weights), len(self.weights))
            except ValueError as err:
                raise setting_error(section, "weights", self.weights, f"a probability vector ({err})") from None

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> StaticStrategy:
        self.validate()
        return StaticStrategy(stream, weights=None if self.weights is None else list(self.weights), basis=self.basis,
                              share=self.share)
