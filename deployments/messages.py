"""What crosses between the deployments (pickled by Serve): frozen dataclasses, no behaviour.

    build_app ──AppSpec──▶ every deployment (computed once)
    router ──RouterReport──▶ controller ──ControllerReply──▶ router   (every report_interval_s)
    ingress ──GenerateRequest──▶ router   (a Serve call per request: admission, cancellation, errors)
    router ──RouterError or the engine's own error──▶ ingress   (the ingress alone makes the client's error)
    router ──one message per step: [(request id, [StepOutput, ...]), ...]──▶ ingress  (deployments/tokens/)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.engine import SamplingParams
from cluster.placement import Placement, Table
from cluster.tiers import TierLayout
from deployments.config import AppConfig
from deployments.policy import AutoscalePolicy


@dataclass(frozen=True)
class AppSpec:
    """Everything build_app computed once and bound into the deployments."""

    build_id: str  # unique per build_app: during Serve's rolling updates, replicas of two builds coexist
    cfg: AppConfig
    placement: Placement | None  # the initial placement (None: experts stay in the routers)
    policy: AutoscalePolicy | None
    data_plane_secret: str
    moe_layers: tuple[int, ...]  # layer ids of the MoE layers: rows of every expert-load matrix
    num_experts: int
    expert_bytes: int  # one routed expert's weights at the serving dtype (memory budgets)
    tiers: TierLayout | None = None  # expert tiers (cluster.tiers): the online tier step's view of the workers


@dataclass(frozen=True)
class RouterSettings:
    """The runtime policy as far as routers apply it."""

    copy_choice: str = "even"  # cluster.copy_choice.RULES
    ema_alpha: float = 2.0 / 51
    # The policy last set by PUT /admin/policy (every field; None: the deployment's own) and when
    # (time.time()). Every router keeps the newest it was sent, so a restarted controller gets it
    # back from their reports, as it gets the table.
    policy: dict | None = None
    revision: float = 0.0


@dataclass(frozen=True)
class RouterReport:
    build_id: str  # a report from a router of another build (rolling update) is ignored
    router_id: str
    node_id: str
    table_version: int  # the table this router routes by now (switched at a step boundary)
    expert_load: list[list[float]]  # [L, E] EMA tokens per step
    total_tokens: list[list[int]]  # [L, E] since the router started
    coactivation: list | None  # [L, E, E] counts, only when the policy co-locates
    down: tuple[tuple[int, int], ...]  # (worker, generation) this router saw fail
    stats: dict = field(default_factory=dict)  # engine and data-plane figures
    table: Table | None = None  # only when the controller asked for it (after a controller restart)
    settings: RouterSettings | None = None  # the newest the router was sent: a restarted controller restores its policy


@dataclass(frozen=True)
class ControllerReply:
    table: Table | None  # a newer table to switch to at the next step boundary
    settings: RouterSettings
    send_table: bool = False  # the controller lost its state: send your table next time


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    params: SamplingParams
    skip: int = 0  # resuming on another router: outputs already delivered (replayed, not sent again)
    request_id: str = ""  # unique per attempt: outputs of an attempt abandoned on a dead router are dropped
    reply_to: str | None = None  # the ingress replica's token sink; None: outputs come in the Serve call


RouterErrorKind = Literal["stopped", "uncovered", "full", "internal"]


class RouterError(Exception):
    """Why a router refused or ended a request, in the router's terms: its engine loop is not running
    ("stopped"), an expert has no live copy ("uncovered"), its queue is full ("full"), or anything
    unexpected ("internal": no text of it leaves the router). The engine's own errors (InvalidRequest,
    SequenceFailed, EngineDeadError, ExpertUnavailable) cross as they are. The ingress alone turns
    either into the client's error (deployments/api/errors.classify)."""

    def __init__(self, kind: RouterErrorKind, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # Serve ships exceptions between processes
        return RouterError, (self.kind, str(self))
