"""Storage: DynamoDB tables, the S3 bucket and the SQS queues, behind typed repositories (DESIGN §9, §11).

Build one :class:`Store` per process and share it (boto3 clients are thread-safe)::

    store = Store(AwsClients(StoreConfig.from_env()))
    store.runs.start(run_id, runner_id)

The schema (:mod:`hivemind.store.schema`) is the single definition of every resource; the CDK stack and
:func:`hivemind.store.bootstrap.create_all` both read it.
"""

from __future__ import annotations

from functools import cached_property

from hivemind.store.agents import AgentRepository
from hivemind.store.audit import AuditRepository
from hivemind.store.base import Clock, Page, system_clock
from hivemind.store.billing import BillingRepository
from hivemind.store.blobs import BlobStore
from hivemind.store.config import AwsClients, StoreConfig
from hivemind.store.credentials import CredentialRepository
from hivemind.store.nonces import NonceRepository
from hivemind.store.prices import PriceRepository
from hivemind.store.ratelimits import RateLimitRepository
from hivemind.store.rooms import RoomRepository
from hivemind.store.runners import RunnerRepository
from hivemind.store.runs import RunRepository
from hivemind.store.tenants import TenantRepository

__all__ = ["AwsClients", "Page", "Store", "StoreConfig"]


class Store:
    """Every repository of one deployment, sharing one set of clients and one clock."""

    def __init__(self, clients: AwsClients, *, clock: Clock = system_clock) -> None:
        self.clients = clients
        self.clock = clock

    @classmethod
    def from_env(cls) -> Store:
        return cls(AwsClients(StoreConfig.from_env()))

    @property
    def config(self) -> StoreConfig:
        return self.clients.config

    @cached_property
    def credentials(self) -> CredentialRepository:
        return CredentialRepository(self.clients, self.clock)

    @cached_property
    def tenants(self) -> TenantRepository:
        return TenantRepository(self.clients, self.clock)

    @cached_property
    def rooms(self) -> RoomRepository:
        return RoomRepository(self.clients, self.clock)

    @cached_property
    def agents(self) -> AgentRepository:
        return AgentRepository(self.clients, self.clock)

    @cached_property
    def runs(self) -> RunRepository:
        return RunRepository(self.clients, self.clock)

    @cached_property
    def runners(self) -> RunnerRepository:
        return RunnerRepository(self.clients, self.clock)

    @cached_property
    def audit(self) -> AuditRepository:
        return AuditRepository(self.clients, self.clock)

    @cached_property
    def nonces(self) -> NonceRepository:
        return NonceRepository(self.clients, self.clock)

    @cached_property
    def rate_limits(self) -> RateLimitRepository:
        return RateLimitRepository(self.clients, self.clock)

    @cached_property
    def blobs(self) -> BlobStore:
        return BlobStore(self.clients, self.clock)

    @cached_property
    def prices(self) -> PriceRepository:
        return PriceRepository(self.clients, self.clock)

    @cached_property
    def billing(self) -> BillingRepository:
        return BillingRepository(self.clients, self.clock, self.blobs)
