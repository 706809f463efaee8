"""The fast-slow chasing term and the role-swap rule of OFS-DPO.

With margins ``h_k = β[(ℓ_k(y⁺) − ℓ_ref(y⁺)) − (ℓ_k(y⁻) − ℓ_ref(y⁻))]`` of the leader F and the chaser S,
``L_FS(F, S) = mean(−log σ(h_F − h_S))`` (DPO of F with S as the reference). The leader minimises it, the chaser
maximises it:

    L_leader = L_DPO(F) + α · L_FS(F, sg S)
    L_chaser = L_DPO(S) − α · L_FS(sg F, S)

so that ∂/∂h_F = −[σ(−h_F) + α σ(h_S − h_F)]/n and ∂/∂h_S = −[σ(−h_S) + α σ(h_S − h_F)]/n: both modules get the
same extra push towards larger margins, sized by the gap between them, which persists when the DPO gradient has
vanished. :func:`chasing_term` is the α part (the DPO parts are the ordinary objective of each module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor


def chasing_term(h_leader: Tensor, h_chaser: Tensor, alpha: float, stopgrad: bool = True,
                 gap_clamp: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """``α·L_FS(F, sg S) − α·L_FS(sg F, S)`` (a scalar) and its metrics ``gap`` (mean h_F − h_S) and ``push``
    (mean σ(h_S − h_F)). With ``stopgrad=False`` both terms backpropagate into both modules; ``gap_clamp`` bounds
    |h_F − h_S| (the chaser's term is otherwise unbounded below)."""

    def l_fs(h_f: Tensor, h_s: Tensor) -> Tensor:
        gap = h_f - h_s
        if gap_clamp is not None:
            gap = gap.clamp(-gap_clamp, gap_clamp)
        return -F.logsigmoid(gap).mean()

    if stopgrad:
        term = alpha * l_fs(h_leader, h_chaser.detach()) - alpha * l_fs(h_leader.detach(), h_chaser)
    else:
        term = alpha * l_fs(h_leader, h_chaser) - alpha * l_fs(h_leader, h_chaser)  # = 0 in value and gradient
    gap = (h_leader - h_chaser).detach()
    return term, {"gap": gap.mean().item(), "push": F.sigmoid(-gap).mean().item()}


@dataclass
class RoleState:
    """Which module leads, and the window of per-step DPO losses that decides it.

    Every ``interval`` optimizer steps the module with the lower mean DPO loss over the window takes the lead (a tie
    goes to ``fast``) and the window restarts; between boundaries the roles never change. ``add`` takes the losses
    already averaged over micro-batches and processes, so that every process decides alike.
    """

    interval: int
    leader: str = "fast"
    swaps: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"fast": 0.0, "slow": 0.0})
    count: int = 0

    def add(self, loss_fast: float, loss_slow: float) -> None:
        self.sums["fast"] += loss_fast
        self.sums["slow"] += loss_slow
        self.count += 1

    def decide(self) -> bool:
        """Closes the window (call it after ``add`` at a boundary, or for a final check); True when the lead
        changed hands."""
        if self.count == 0:
            return False
        new = "fast" if self.sums["fast"] <= self.sums["slow"] else "slow"  # equal counts: sums order as means
        changed = new != self.leader
        self.leader, self.swaps = new, self.swaps + changed
        self.sums, self.count = {"fast": 0.0, "slow": 0.0}, 0
        return changed

    def step(self, step: int, loss_fast: float, loss_slow: float) -> bool:
        """Records optimizer step ``step`` (1-based) and decides at every ``interval``-th step."""
        self.add(loss_fast, loss_slow)
        return self.decide() if step % self.interval == 0 else False

    @property
    def chaser(self) -> str:
        return "slow" if self.leader == "fast" else "fast"

    def state_dict(self) -> dict:
        return {"interval": self.interval, "leader": self.leader, "swaps": self.swaps, "sums": dict(self.sums),
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.interval, self.leader, self.swaps = state["interval"], state["leader"], state["swaps"]
        self.sums, self.count = dict(state["sums"]), state["count"]
