"""Drafter confidence (CM-ASD, Sen et al., arXiv 2508.15371): pure tensor functions over logits [..., V].

- entropy confidence   C_ent    = 1 - H(q) / log|V|
- logit-margin         C_margin = sigmoid((z_1 - z_2) / s)
- softmax margin       C_soft   = p_1 - p_2
- ensemble             C_t      = l1 * C_ent + l2 * C_margin + l3 * C_soft   (weights sum to 1)

Every value lies in [0, 1] and grows with the drafter's certainty. Tokens outside a reduced vocabulary
(logit -inf) carry zero probability and do not count towards |V| in the entropy normaliser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaspec.core.errors import AdaspecError

METRICS = ("entropy", "margin", "softmax")


def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    """1 - H(softmax(logits)) / log(number of finite logits): 1 for a one-hot, 0 for uniform."""
    finite = torch.isfinite(logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp.masked_fill(~finite, 0.0)).sum(-1)
    support = finite.sum(-1).clamp_min(2).float()
    return (1.0 - h / support.log()).clamp(0.0, 1.0)


def _top2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(x, 2, dim=-1).values
    return top[..., 0], top[..., 1]


def margin_confidence(logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """sigmoid((z_1 - z_2) / s) of the two largest logits: 0.5 at a tie, towards 1 as the gap grows."""
    z1, z2 = _top2(logits.float())
    gap = (z1 - z2).nan_to_num(posinf=1e4)  # a lone finite logit: certain
    return torch.sigmoid(gap / scale)


def softmax_margin_confidence(logits: torch.Tensor) -> torch.Tensor:
    """p_1 - p_2 of the two most probable tokens."""
    p1, p2 = _top2(torch.softmax(logits.float(), dim=-1))
    return p1 - p2


@dataclass(frozen=True)
class ConfidenceEnsemble:
    """C_t = l1*C_ent + l2*C_margin + l3*C_soft; `only` picks one metric for debugging."""

    l1: float = 1 / 3
    l2: float = 1 / 3
    l3: float = 1 / 3
    scale: float = 1.0  # s in the logit-margin sigmoid
    only: str | None = None

    def __post_init__(self) -> None:
        if min(self.l1, self.l2, self.l3) < 0 or not math.isclose(self.l1 + self.l2 + self.l3, 1.0, abs_tol=1e-6):
            raise AdaspecError(f"confidence weights must be >= 0 and sum to 1, got {self.l1}, {self.l2}, {self.l3}")
        if not 0 < self.scale < math.inf:
            raise AdaspecError(f"the logit-margin scale s must be a finite number > 0, got {self.scale}")
        if self.only is not None and self.only not in METRICS:
            raise AdaspecError(f"unknown confidence metric '{self.only}'; choose one of {', '.join(METRICS)}")

    def components(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"entropy": entropy_confidence(logits), "margin": margin_confidence(logits, self.scale),
                "softmax": softmax_margin_confidence(logits)}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        parts = self.components(logits)
        if self.only is not None:
            return parts[self.only]
        return self.l1 * parts["entropy"] + self.l2 * parts["margin"] + self.l3 * parts["softmax"]


def annealed_temperature(layer: int, depth: int, a: float) -> float:
    """SpecBound's calibration temperature of an exit after `layer` of `depth` layers: T_l = 1 + a (1 - l / L).
    Shallow exits are softened (T > 1), the last layer is left as it is (T = 1)."""
    return 1.0 + a * (1.0 - layer / depth)


def annealed_confidence(logits: torch.Tensor, layer: int, depth: int, a: float) -> torch.Tensor:
    """max softmax(z / T_l): an exit's confidence in its top token, calibrated by depth (SpecBound)."""
    return torch.softmax(logits.float() / annealed_temperature(layer, depth, a), dim=-1).amax(-1)
