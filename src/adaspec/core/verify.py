"""Acceptance rules, in paper notation: p = target distributions, q = draft distributions.

Every rule takes the target's logits at the k+1 verified positions (position i scores the token after
the i-th drafted one; position k gives the bonus token) and returns (n, x): the number of drafted
tokens kept, and the token appended after them (the correction on rejection, the bonus otherwise).
Rules also get the drafter's per-token `confidence` C_t; the exact rules ignore it.

The relaxed rules (SpecDec's top-beta / tau, CM-ASD's confidence-modulated tau) are lossy by design: they
keep drafted tokens the target would not have chosen, when the target ranks them high enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from adaspec.core.config import CMASD_TAU_MODE, SPECDEC_BETA, SPECDEC_TAU, SamplingConfig
from adaspec.core.errors import AdaspecError
from adaspec.core.sampling import probs_from_logits, sample

TAU_MODES = ("intent", "literal")
# tau is capped here in the sampled rule: e^80 * p >= 1 >= q wherever p > 2e-35, so a larger tau changes nothing,
# while math.exp(tau) overflows beyond ~709
MAX_LOG_SLACK = 80.0


class AcceptanceRule(Protocol):
    def __call__(
        self,
        target_logits: torch.Tensor,  # [k+1, V]
        draft_tokens: list[int],  # [k]
        draft_probs: torch.Tensor | None,  # [k, V]; None: a deterministic drafter (q is one-hot)
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        confidence: list[float] | None = None,  # [k] C_t, the drafter's confidence per drafted token
    ) -> tuple[int, int]: ...


def greedy_accept(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    confidence: list[float] | None = None,
) -> tuple[int, int]:
    """Keep the longest drafted prefix equal to the target's argmax; the output equals greedy decoding."""
    top1 = target_logits.argmax(-1).tolist()  # [k+1]
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == top1[n]:
        n += 1
    return n, top1[n]


def speculative_sampling(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    confidence: list[float] | None = None,
) -> tuple[int, int]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection draw from
    norm(max(0, p_i - q_i)); if all k are accepted draw the bonus from p_k. The emitted tokens are
    distributed exactly as sampling from p token by token.

    On a GPU the logits stay there: p(x_i) and q(x_i) come back in one read, then the one row drawn from (the
    residual or the bonus); the random draws are the host generator's, as on the CPU.
    """
    p = probs_from_logits(target_logits, sampling)  # [k+1, V]
    k = len(draft_tokens)
    if k:
        rows, drafted = torch.arange(k, device=p.device), torch.tensor(draft_tokens, device=p.device)
        p_x = p[rows, drafted]  # [k]
        q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs[rows, drafted].to(p_x.dtype)
        p_drafted, q_drafted = torch.stack([p_x, q_x]).tolist()  # [k] each: one read
    for i, x in enumerate(draft_tokens):
        if float(torch.rand((), generator=generator)) * q_drafted[i] < p_drafted[i]:
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
        residual = host_row(residual)  # [V]
        mass = float(residual.sum())
        return i, sample(residual / mass if mass > 0 else host_row(p[i]), generator)
    return k, sample(host_row(p[-1]), generator)


def host_row(row: torch.Tensor) -> torch.Tensor:
    """A distribution row [V] on the host (one read from a device; the same tensor on the CPU)."""
    return row.cpu()


def rule_for(sampling: SamplingConfig) -> AcceptanceRule:
    """The exact rule for a sampling config: greedy matching at temperature 0, else speculative sampling."""
    return greedy_accept if sampling.greedy else speculative_sampling


def modulated_tau(confidence: list[float], tau_base: float, gamma: float, mode: str = CMASD_TAU_MODE) -> list[float]:
    """CM-ASD's per-token tolerance tau_t from the drafter's confidence C_t, in nats.

    The paper's prose says confident drafts are verified leniently and uncertain ones strictly, while its
    formula tau_t = tau_base + gamma * (1 - C_t) relaxes the check when confidence is *low*. Both are offered:
      intent:  tau_t = tau_base + gamma * C_t         (what the prose describes; the default)
      literal: tau_t = tau_base + gamma * (1 - C_t)   (the formula as printed)
    Both span [tau_base, tau_base + gamma]; gamma = 0 is SpecDec's fixed tau.
    """
    if mode == "intent":
        return [tau_base + gamma * c for c in confidence]
    if mode == "literal":
        return [tau_base + gamma * (1.0 - c) for c in confidence]
    raise AdaspecError(f"unknown tau_mode '{mode}'; choose one of {', '.join(TAU_MODES)}")


def top_beta_tau_accept(
    target_logits: torch.Tensor,  # [k+1, V]
    draft_tokens: list[int],  # [k]
    beta: int,
    tau: list[float],  # [k] tau_t in nats
) -> tuple[int, int]:
    """SpecDec-style relaxed greedy verification (Xia et al. 2023), with a per-token tolerance tau_t.

    Accept x_t when it is in the target's top-beta at position t AND log p_t(top1) - log p_t(x_t) <= tau_t
    (p at temperature 1, so the gap is z_top1 - z_x of the logits); on the first rejection emit the
    target's top-1, and the top-1 of the last position as the bonus when all pass. Ties count against x_t
    and top-1 is the argmax, so beta = 1 with tau = 0 is exactly greedy decoding.
    """
    z = target_logits.float()  # [k+1, V]
    top1 = z.argmax(-1).tolist()  # [k+1], as greedy_accept
    for t, x in enumerate(draft_tokens):
        if x == top1[t]:
            continue
        ahead = int((z[t] >= z[t, x]).sum()) - 1  # other tokens at least as likely as x_t
        if ahead >= beta or float(z[t, top1[t]] - z[t, x]) > tau[t]:
            return t, top1[t]
    return len(draft_tokens), top1[-1]


def lenient_speculative_sampling(
    target_logits: torch.Tensor,  # [k+1, V]
    draft_tokens: list[int],  # [k]
    draft_probs: torch.Tensor | None,  # [k, V]; None: q is one-hot at the drafted token
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    beta: int,
    tau: list[float],  # [k] tau_t in nats
) -> tuple[int, int]:
    """The top-beta / tau rule at temperature > 0: speculative sampling with log-slack tau_t.

    With p the target's warped distribution (temperature, top-k, top-p) and q the draft's, position t keeps
    x_t ~ q with probability a(x_t) / q(x_t), where a = min(q, e^tau_t p) on p's top-beta and 0 elsewhere;
    on rejection it samples the correction from norm(max(0, p - a)). The emitted token then has law
    a + (1 - sum a) * norm(max(0, p - a)), which never exceeds e^tau_t p(x) for any x: tau bounds how far a
    token's probability may rise above the target's. tau = 0 with beta >= |V| is exactly lossless speculative
    sampling (same decisions from the same random draws).
    """
    p = probs_from_logits(target_logits, sampling)  # [k+1, V]
    for t, x in enumerate(draft_tokens):
        if draft_probs is None:
            q = torch.zeros_like(p[t])
            q[x] = 1.0
        else:
            q = draft_probs[t]  # [V]
        top = torch.zeros_like(p[t], dtype=torch.bool)
        top[torch.topk(p[t], min(beta, p.shape[-1])).indices] = True
        slack = math.exp(min(tau[t], MAX_LOG_SLACK))
        a = torch.where(top, torch.minimum(q, slack * p[t]), torch.zeros_like(q))  # [V]
        if float(torch.rand((), generator=generator)) * float(q[x]) < float(a[x]):
            continue
        residual = (p[t] - a).clamp_min(0.0)
        mass = float(residual.sum())
        return t, sample(residual / mass if mass > 0 else p[t], generator)
    return len(draft_tokens), sample(p[-1], generator)


@dataclass(frozen=True)
class TopBetaTau:
    """The relaxed acceptance rule of `specdec` (gamma = 0: a fixed tau) and of `cmasd` / `cmasd-tau` (tau_t moved
    by the drafter's confidence, `modulated_tau`). Greedy: `top_beta_tau_accept`; temperature > 0:
    `lenient_speculative_sampling`."""

    beta: int = SPECDEC_BETA
    tau_base: float = SPECDEC_TAU
    gamma: float = 0.0
    tau_mode: str = CMASD_TAU_MODE

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise AdaspecError(f"beta (top-beta) must be >= 1, got {self.beta}")
        if not (0 <= self.tau_base < math.inf and 0 <= self.gamma < math.inf):  # nan would accept every top-beta
            raise AdaspecError(f"tau (tau_base) and gamma must be finite numbers >= 0, got {self.tau_base}, "
                               f"{self.gamma}")
        if self.tau_mode not in TAU_MODES:
            raise AdaspecError(f"unknown tau_mode '{self.tau_mode}'; choose one of {', '.join(TAU_MODES)}")

    def tau(self, confidence: list[float] | None, k: int) -> list[float]:
        if self.gamma == 0:
            return [self.tau_base] * k
        if confidence is None or len(confidence) != k:
            raise AdaspecError("confidence-modulated tau needs the drafter's confidence for every drafted token")
        return modulated_tau(confidence, self.tau_base, self.gamma, self.tau_mode)

    def __call__(
        self,
        target_logits: torch.Tensor,
        draft_tokens: list[int],
        draft_probs: torch.Tensor | None,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        confidence: list[float] | None = None,
    ) -> tuple[int, int]:
        tau = self.tau(confidence, len(draft_tokens))
        if sampling.greedy:
            return top_beta_tau_accept(target_logits, draft_tokens, self.beta, tau)
        return lenient_speculative_sampling(target_logits, draft_tokens, draft_probs, sampling, generator,
                                            self.beta, tau)
