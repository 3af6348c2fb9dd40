"""The services a plugin may use: the chain, the signing hotkey, storage and the run's records.

One :class:`Services` object per process, built lazily from the ``firstresult`` providers
(``covenant_chain``, ``covenant_hotkey``, ``covenant_exchange``) the first time something asks,
and handed to the hooks that need it (``covenant_outer_step``, ``covenant_scorer``,
``covenant_submit_weights``). A plugin never constructs a chain client or a transport itself and
never imports another plugin: it asks this object, so a third-party outer step or scorer works
with whatever chain and storage the operator configured::

    @hookimpl
    def covenant_outer_step(config, name, services):
        if name == "my-outer":
            return MyOuterStep(services)   # services.chain, .hotkey, .uid, .exchange, .transport

Everything here is read on the process that does I/O (global rank 0 of a peer); other ranks
receive decisions through the outer step's own collectives.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from covenant.engine.errors import ConfigError, CovenantError
from covenant.engine.protocols import (
    Chain,
    Exchange,
    Neuron,
    NotRegisteredError,
    Transport,
    lead_validator,
)

if TYPE_CHECKING:
    from covenant.engine.config import Config

log = logging.getLogger(__name__)


class Services:
    """Chain, hotkey, uid, storage and records of this process (see the module docstring)."""

    def __init__(self, config: Config, hook: Any, *, metagraph_ttl_s: float = 2.0) -> None:
        self.config = config
        self.hook = hook
        self.metagraph_ttl_s = metagraph_ttl_s
        self._metagraph: tuple[float, list[Neuron]] | None = None

    # -- providers (each built once) ------------------------------------------------------------

    @functools.cached_property
    def chain(self) -> Chain:
        chain = self.hook.covenant_chain(config=self.config)
        if chain is None:
            raise ConfigError("no chain provider is enabled (enable the 'chain' plugin)")
        return chain  # type: ignore[no-any-return]

    @functools.cached_property
    def hotkey(self) -> Any:
        """This process's signing key (a ``bittensor.sp_core.Keypair``)."""
        key = self.hook.covenant_hotkey(config=self.config)
        if key is None:
            raise ConfigError(
                "no hotkey is configured: set [chain] hotkey (e.g. //Alice, a key file, "
                "wallet:NAME/HOTKEY)"
            )
        return key

    @functools.cached_property
    def exchange(self) -> Exchange:
        exchange = self.hook.covenant_exchange(config=self.config, services=self)
        if exchange is None:
            raise ConfigError("no storage provider is enabled (enable the 'storage' plugin)")
        return exchange  # type: ignore[no-any-return]

    @property
    def transport(self) -> Transport:
        """This process's own bucket (it writes only here)."""
        return self.exchange.transport

    def peer_transport(self, hotkey: str) -> Transport | None:
        """A read transport for another peer's bucket, from its chain commitment."""
        return self.exchange.peer_transport(hotkey)

    # -- chain views ------------------------------------------------------------------------------

    def metagraph(self, *, fresh: bool = False) -> list[Neuron]:
        """The registered neurons (cached for ``metagraph_ttl_s`` seconds)."""
        now = time.monotonic()
        if fresh or self._metagraph is None or now - self._metagraph[0] > self.metagraph_ttl_s:
            self._metagraph = (now, self.chain.metagraph())
        return self._metagraph[1]

    def hotkeys(self) -> dict[int, str]:
        return {n.uid: n.hotkey for n in self.metagraph()}

    @property
    def uid(self) -> int:
        """This hotkey's uid on the chain (raises :class:`NotRegisteredError` if it has none)."""
        address = self.hotkey.ss58_address
        for neuron in self.metagraph():
            if neuron.hotkey == address:
                return neuron.uid
        for neuron in self.metagraph(fresh=True):
            if neuron.hotkey == address:
                return neuron.uid
        raise NotRegisteredError(f"hotkey {address} is not registered on the chain")

    def lead(self) -> Neuron | None:
        """The lead validator (highest stake with a permit), whose records miners follow."""
        return lead_validator(self.metagraph())

    def is_lead(self) -> bool:
        lead = self.lead()
        return lead is not None and lead.hotkey == self.hotkey.ss58_address


def open_services(config: Config, hook: Any) -> Services:
    """The services of ``config`` (nothing is contacted until first use)."""
    return Services(config, hook)


__all__ = ["CovenantError", "Services", "open_services"]
