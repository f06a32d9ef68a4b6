"""Verifying drafts: which drafted tokens a step accepts, and the token that follows them.

A sequence with k drafts brings k + 1 rows of target probabilities: row j is the distribution of the token
after draft j (row 0: after the sequence's last token). Draft j + 1 is accepted with probability
min(1, p_j(d) / q_j(d)); at the first rejection the token is drawn from the residual max(p_j - q_j, 0),
and when every draft holds, row k gives a bonus token (Leviathan et al. 2023, Chen et al. 2023). Proposers
that draft without a distribution (n-gram, suffix) are point masses q_j = 1 at d: acceptance with
probability p_j(d) and a residual of p_j without d. Either way the emitted tokens are distributed exactly as
plain sampling's; for greedy rows the target is a point mass too, so a draft holds when it is the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.engine.sampling_ops import draw_tokens


def verify_rows(
    probs: torch.Tensor,
    draft_ids: torch.Tensor,
    accept_uniform: torch.Tensor,
    uniform: torch.Tensor,
    any_seeded: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of unnormalised target ``probs`` ``[m, vocab]`` and its draft ``draft_ids`` ``[m]`` (-1: none,
    the bonus row): whether the draft is accepted ``[m]`` bool, and the token drawn if it is not (from the
    residual; from ``probs`` on a bonus row) ``[m]``. ``accept_uniform`` / ``uniform`` ``[m]`` float64: a
    seeded row's own draws, NaN where they are drawn here."""
    has_draft = draft_ids >= 0  # [m]
    draft = draft_ids.clamp(min=0).unsqueeze(1)  # [m, 1]
    draft_prob = probs.gather(1, draft).squeeze(1).double()  # [m]
    total = probs.sum(dim=-1).double()  # [m]
    fresh = torch.rand(accept_uniform.shape, dtype=torch.float64, device=probs.device)
    u = torch.where(accept_uniform.isnan(), fresh, accept_uniform) if any_seeded else fresh
    accepted = has_draft & (u * total < draft_prob)
    residual = probs.scatter(1, draft, 0.0)  # [m, vocab]
    # A draft holding all the mass is always accepted: its row then draws from probs, any valid token.
    use_residual = has_draft & (residual.sum(dim=-1) > 0)
    residual = torch.where(use_residual.unsqueeze(1), residual, probs)
    return accepted, draw_tokens(residual, uniform, any_seeded)


@dataclass
class VerifiedRun:
    """What one sequence's verification emits: its accepted drafts, then one token from the target."""

    accepted: list[int]  # the leading drafts that held
    token_row: int  # the row whose drawn token follows them (a residual draw, or the bonus row)


def accepted_runs(drafts: list[list[int]], accepted: list[bool]) -> list[VerifiedRun]:
    """Each sequence's run from the rows' acceptance (read back): drafts up to the first rejected one."""
    runs, row = [], 0
    for draft in drafts:
        count = 0
        while count < len(draft) and accepted[row + count]:
            count += 1
        runs.append(VerifiedRun(draft[:count], row + count))
        row += len(draft) + 1
    return runs
