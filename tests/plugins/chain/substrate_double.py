"""An in-process double of the Bittensor SDK's ``Substrate`` contract, for ``substrate=``.

``bittensor.SyncClient(network, substrate=SubstrateDouble(...))`` runs the SDK's *own* code
(namespaces, metagraph decoding, the intent executor with SetWeights' preflight, conform and
commit-reveal branches, the raw-call path) against this object instead of a websocket. The double
holds a tiny subnet's state and answers the reads that code path makes with plain decoded values
(as ``RpcSubstrate`` does after SCALE decoding); writes are dispatched like a node would:
the signer must produce a valid sr25519 signature, the hotkey must be registered, weights obey
the rate limit, and each accepted extrinsic is included in a new block.

What it does not cover: SCALE encoding of calls and real-node acceptance (the decoded
``CommitmentInfo`` layout, for instance). Those need a real subtensor (see docs/chain.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from bittensor import Balance, ChainError, ExtrinsicResult, RpcConnectionError
from bittensor.sp_core import Keypair

U16_MAX = 65535


@dataclass
class ComposedCall:
    """What ``compose`` returns: the call, plus ``data`` bytes like the SDK's GenericCall."""

    module: str
    function: str
    params: dict[str, Any]

    @property
    def data(self) -> bytes:
        return json.dumps(
            [self.module, self.function, _jsonable(self.params)], sort_keys=True
        ).encode()

    @property
    def value(self) -> dict[str, Any]:
        return {
            "call_module": self.module,
            "call_function": self.function,
            "call_args": [{"name": k, "value": v} for k, v in self.params.items()],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class DoubleNeuron:
    hotkey: str
    coldkey: str
    stake_rao: int = 0
    validator_permit: bool = False
    registered_at: int = 0


@dataclass
class SubstrateDouble:
    """A one-subnet chain in memory. Mutate the fields to set up a scenario."""

    netuid: int = 3
    block: int = 1000
    block_time_s: float = 12.0
    genesis_ms: int = field(default_factory=lambda: int(time.time() * 1000) - 1000 * 12_000)
    neurons: list[DoubleNeuron] = field(default_factory=list)
    commit_reveal: bool = False
    weights_rate_limit: int = 100
    min_allowed_weights: int = 0
    max_weights_limit: int = U16_MAX
    tempo: int = 360
    reveal_period_epochs: int = 1
    # Storage written by extrinsics.
    commitment_of: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    last_update: dict[int, int] = field(default_factory=dict)
    timelocked: list[dict[str, Any]] = field(default_factory=list)
    submitted: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # (module, function, signer)
    # Failure injection.
    connect_failures: int = 0  # the next N connects raise RpcConnectionError (endpoint down)
    read_failures: int = 0  # the next N block_number reads raise RpcConnectionError
    calls: list[str] = field(default_factory=list)  # every contract method called, in order
    token_symbols: dict[int, str] = field(default_factory=dict)
    connected: bool = False

    # -- set-up helpers -----------------------------------------------------------------------

    def add_neuron(self, hotkey: str, *, stake: float = 0.0, validator_permit: bool = False) -> int:
        cold = Keypair.create_from_seed(hashlib.blake2b(hotkey.encode(), digest_size=32).digest())
        self.neurons.append(
            DoubleNeuron(hotkey, cold.ss58_address, int(stake * 1e9), validator_permit, self.block)
        )
        return len(self.neurons) - 1

    def replace_neuron(self, uid: int, hotkey: str) -> None:
        """Re-registration: ``uid`` now belongs to ``hotkey`` (the old hotkey's commitment stays)."""
        self.neurons[uid] = DoubleNeuron(hotkey, self.neurons[uid].coldkey, 0, False, self.block)
        self.weights.pop(uid, None)
        self.last_update.pop(uid, None)

    def uid_of(self, hotkey: str) -> int | None:
        for uid, n in enumerate(self.neurons):
            if n.hotkey == hotkey:
                return uid
        return None

    def hash_of(self, block: int) -> str:
        return (
            "0x"
            + hashlib.blake2b(f"double-{self.netuid}-{block}".encode(), digest_size=32).hexdigest()
        )

    def _block_of_hash(self, block_hash: str | None) -> int:
        if block_hash is None:
            return self.block
        for b in range(self.block, -1, -1):
            if self.hash_of(b) == block_hash:
                return b
        raise ChainError(f"unknown block hash {block_hash}")

    def timestamp_ms(self, block: int) -> int:
        return self.genesis_ms + int(block * self.block_time_s * 1000)

    # -- the Substrate contract: lifecycle ----------------------------------------------------

    def balance(self, rao: int, netuid: int = 0) -> Balance:
        return Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    async def connect(self) -> None:
        self.calls.append("connect")
        if self.connect_failures > 0:
            self.connect_failures -= 1
            raise RpcConnectionError("connection refused (substrate double: endpoint down)")
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    # -- reads --------------------------------------------------------------------------------

    async def block_hash(self, block: int | None = None) -> str:
        self.calls.append("block_hash")
        b = self.block if block is None else int(block)
        if b > self.block:
            raise ChainError(f"block {b} not produced yet")
        return self.hash_of(b)

    async def block_number(self) -> int:
        self.calls.append("block_number")
        if self.read_failures > 0:
            self.read_failures -= 1
            raise RpcConnectionError("connection reset (substrate double)")
        return self.block

    async def finalized_block_number(self) -> int:
        return self.block

    async def block_time(self) -> float:
        return self.block_time_s

    async def spec_version(self) -> int:
        return 400

    async def get_block(
        self, block_number: int | None = None, block_hash: str | None = None
    ) -> dict | None:
        self.calls.append("get_block")
        b = (
            self._block_of_hash(block_hash)
            if block_hash
            else (self.block if block_number is None else block_number)
        )
        if b > self.block or b < 0:
            return None
        return {
            "header": {
                "number": b,
                "hash": self.hash_of(b),
                "parentHash": self.hash_of(max(0, b - 1)),
            },
            "extrinsics": [
                {
                    "call": {
                        "call_module": "Timestamp",
                        "call_function": "set",
                        "call_args": [{"name": "now", "value": self.timestamp_ms(b)}],
                    }
                }
            ],
        }

    async def query(
        self,
        module: str,
        storage_function: str,
        params: list | None = None,
        block_hash: str | None = None,
    ) -> Any:
        self.calls.append(f"query {module}.{storage_function}")
        p = list(params or [])
        name = (module, storage_function)
        if name == ("Timestamp", "Now"):
            return self.timestamp_ms(self._block_of_hash(block_hash))
        if module != "SubtensorModule":
            raise ChainError(f"double: no storage {module}.{storage_function}")
        if storage_function == "Uids":
            return self.uid_of(p[1]) if p[0] == self.netuid else None
        if storage_function == "SubnetworkN":
            return len(self.neurons)
        per_subnet = {
            "CommitRevealWeightsEnabled": self.commit_reveal,
            "WeightsSetRateLimit": self.weights_rate_limit,
            "MinAllowedWeights": self.min_allowed_weights,
            "MaxWeightsLimit": self.max_weights_limit,
            "SubnetEpochConsensus": "Yuma",
            "Tempo": self.tempo,
            "RevealPeriodEpochs": self.reveal_period_epochs,
            "LastEpochBlock": self.block - self.block % self.tempo,
            "PendingEpochAt": 0,
            "SubnetEpochIndex": self.block // self.tempo,
            "BlocksSinceLastStep": self.block % self.tempo,
        }
        if storage_function in per_subnet:
            return per_subnet[storage_function]
        if storage_function == "LastUpdate":
            return [self.last_update.get(uid, 0) for uid in range(len(self.neurons))]
        if storage_function == "ValidatorPermit":
            return [n.validator_permit for n in self.neurons]
        raise ChainError(f"double: no storage {module}.{storage_function}")

    async def map_has_entries(
        self, module: str, storage_function: str, params: list, block_hash: str | None = None
    ) -> bool:
        return bool(await self.query_map(module, storage_function, params, block_hash))

    async def query_map(
        self,
        module: str,
        storage_function: str,
        params: list | None = None,
        block_hash: str | None = None,
    ) -> list[tuple[Any, Any]]:
        self.calls.append(f"query_map {module}.{storage_function}")
        name = (module, storage_function)
        if name == ("SubtensorModule", "TokenSymbol"):
            return [(self.netuid, list("γ".encode()))]
        if name == ("Commitments", "CommitmentOf"):
            return [(hk, dict(rec)) for hk, rec in self.commitment_of.items()]
        if name == ("Commitments", "RevealedCommitments"):
            return []
        if name == ("SubtensorModule", "Uids"):
            return [(n.hotkey, uid) for uid, n in enumerate(self.neurons)]
        raise ChainError(f"double: no storage map {module}.{storage_function}")

    async def query_batch(
        self,
        module: str,
        storage_function: str,
        param_sets: list[list],
        block_hash: str | None = None,
    ) -> list[Any]:
        return [await self.query(module, storage_function, p, block_hash) for p in param_sets]

    async def runtime_call(
        self, api: str, method: str, params: list, block_hash: str | None = None
    ) -> Any:
        self.calls.append(f"runtime {api}.{method}")
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise ChainError(f"double: no runtime API {api}.{method}")
        if int(params[0]) != self.netuid:
            return None
        n = len(self.neurons)
        return {
            "netuid": self.netuid,
            "name": list(b"covenant"),
            "symbol": list("γ".encode()),
            "block": self._block_of_hash(block_hash),
            "tempo": self.tempo,
            "last_step": self.block - self.block % self.tempo,
            "blocks_since_last_step": self.block % self.tempo,
            "owner_hotkey": self.neurons[0].hotkey if self.neurons else "",
            "owner_coldkey": self.neurons[0].coldkey if self.neurons else "",
            "network_registered_at": 0,
            "num_uids": n,
            "max_uids": 256,
            "hotkeys": [x.hotkey for x in self.neurons],
            "coldkeys": [x.coldkey for x in self.neurons],
            "active": [True] * n,
            "validator_permit": [x.validator_permit for x in self.neurons],
            "last_update": [self.last_update.get(uid, 0) for uid in range(n)],
            "block_at_registration": [x.registered_at for x in self.neurons],
            "alpha_stake": [x.stake_rao for x in self.neurons],
            "tao_stake": [0] * n,
            "total_stake": [x.stake_rao for x in self.neurons],
            "emission": [0] * n,
            "axons": [{"ip": 0, "port": 0, "ip_type": 4}] * n,
            "identities": [None] * n,
            "tao_in": 10**12,
            "alpha_in": 10**12,
        }

    async def constant(self, module: str, name: str) -> Any:
        raise ChainError(f"double: no constant {module}.{name}")

    async def decode_scale(self, type_string: str, data: Any) -> Any:
        raise ChainError("double: no SCALE decoding")

    async def blocks(self, *, finalized: bool = False) -> AsyncIterator[dict]:  # pragma: no cover
        yield {"header": {"number": self.block, "parentHash": self.hash_of(self.block - 1)}}

    async def events(self, block_hash: str | None = None) -> list[dict]:
        return []

    # -- calls and fees -----------------------------------------------------------------------

    async def compose(self, call: Any) -> ComposedCall:
        self.calls.append(f"compose {call[0]}.{call[1]}")
        module, function, params = call
        return ComposedCall(module, function, dict(params))

    async def estimate_fee(self, call: Any, keypair: Any) -> Balance:
        return Balance.from_rao(12_345)

    async def estimate_weight(self, call: Any, keypair: Any) -> dict:
        return {"ref_time": 1, "proof_size": 1}

    async def account_next_index(self, address: str) -> int:
        return 0

    async def mev_next_key(self) -> bytes | None:
        return None

    # -- writes -------------------------------------------------------------------------------

    async def submit(
        self,
        call: Any,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = 64,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        composed = call if isinstance(call, ComposedCall) else await self.compose(call)
        self.calls.append(f"submit {composed.module}.{composed.function}")
        # The node checks the extrinsic signature against the signer's public key.
        payload = composed.data + self.hash_of(self.block).encode()
        signature = keypair.sign(payload)
        if not Keypair(ss58_address=keypair.ss58_address).verify(payload, signature):
            return _failed("bad signature", "BadProof")
        signer = keypair.ss58_address
        self.submitted.append((composed.module, composed.function, signer))
        handler = getattr(self, f"_dispatch_{composed.module}_{composed.function}", None)
        if handler is None:
            return _failed(
                f"double: call {composed.module}.{composed.function} not supported", "CallFiltered"
            )
        failure = handler(signer, composed.params)
        if failure is not None:
            return failure
        self.block += 1  # included in the next block
        return ExtrinsicResult(
            success=True,
            message="included",
            block_hash=self.hash_of(self.block),
            extrinsic_id=f"{self.block}-1",
        )

    def _dispatch_Commitments_set_commitment(
        self, signer: str, params: dict
    ) -> ExtrinsicResult | None:
        if int(params["netuid"]) != self.netuid or self.uid_of(signer) is None:
            return _failed("AccountNotAllowedCommit", "AccountNotAllowedCommit")
        info = params["info"]
        fields = info["fields"]
        # The SDK writes the BoundedVec newtype as [[...]]; storage decodes to the flat list.
        if len(fields) == 1 and isinstance(fields[0], list):
            fields = fields[0]
        decoded = []
        for entry in fields:
            ((variant, raw),) = entry.items()
            if not variant.startswith("Raw") or int(variant[3:]) != len(raw) or len(raw) > 128:
                return _failed(f"bad commitment field {variant}", "InvalidArgument")
            decoded.append({variant: "0x" + bytes(raw).hex()})
        if len(decoded) > 3:
            return _failed("TooManyFieldsInCommitmentInfo", "TooManyFieldsInCommitmentInfo")
        self.commitment_of[signer] = {
            "block": self.block + 1,
            "deposit": 0,
            "info": {"fields": decoded},
        }
        return None

    def _check_weights_origin(
        self, signer: str, params: dict
    ) -> tuple[int | None, ExtrinsicResult | None]:
        uid = self.uid_of(signer)
        if int(params["netuid"]) != self.netuid or uid is None:
            return None, _failed("HotKeyNotRegisteredInSubNet", "HotKeyNotRegisteredInSubNet")
        last = self.last_update.get(uid, 0)
        if last and self.block - last < self.weights_rate_limit:
            return None, _failed("SettingWeightsTooFast", "SettingWeightsTooFast")
        return uid, None

    def _dispatch_SubtensorModule_set_mechanism_weights(
        self, signer: str, params: dict
    ) -> ExtrinsicResult | None:
        uid, failure = self._check_weights_origin(signer, params)
        if failure is not None or uid is None:
            return failure
        dests, values = list(params["dests"]), list(params["weights"])
        if len(dests) != len(values) or any(d >= len(self.neurons) for d in dests):
            return _failed("UidVecContainInvalidOne", "UidVecContainInvalidOne")
        if any(not 0 <= v <= U16_MAX for v in values):
            return _failed("InvalidWeights", "InvalidArgument")
        self.weights[uid] = list(zip(dests, values, strict=True))
        self.last_update[uid] = self.block + 1
        return None

    def _dispatch_SubtensorModule_commit_timelocked_mechanism_weights(
        self, signer: str, params: dict
    ) -> ExtrinsicResult | None:
        uid, failure = self._check_weights_origin(signer, params)
        if failure is not None or uid is None:
            return failure
        commit = params["commit"]
        if not isinstance(commit, bytes | bytearray) or not commit:
            return _failed("empty commit", "InvalidArgument")
        self.timelocked.append(
            {
                "uid": uid,
                "commit": bytes(commit),
                "reveal_round": int(params["reveal_round"]),
                "version": int(params["commit_reveal_version"]),
            }
        )
        self.last_update[uid] = self.block + 1
        return None


def _failed(message: str, name: str) -> ExtrinsicResult:
    return ExtrinsicResult(success=False, message=message, error=ChainError(message, name=name))
