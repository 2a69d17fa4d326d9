"""η mixing, the validation split and shard placement: every decision a pure function of (seed, source, id).

Hashes are BLAKE2b of the text `seed|purpose|source|id` (never Python's salted `hash()`, never the order
in which a runner delivers records), so any runner and any number of workers make the same choices.

η mixing (the paper's proportional sampling): all kept agent examples are used, and
`G = round(A · (1 − η) / η)` general examples are drawn without replacement, split across the general
sources by their weights (largest remainder). A source whose pool is smaller than its share gives all it
has and the shortfall goes to the other sources by weight; if all general pools together are too small,
every general example is used and `eta_achieved` (> η) says so. Within a source the examples with the
smallest hashes are drawn, so raising G only adds examples. η = 1 uses no general data; η = 0 no agent data.

Validation: per task, the `round(f · n)` examples with the smallest split hashes (at least one when
f > 0 and the task has two or more), the rest train. Shard: split hash of another purpose modulo the
shard count; the order inside a shard sorts by a third hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Iterable

log = logging.getLogger(__name__)

MIX, SPLIT, SHARD, ORDER = "mix", "validation", "shard", "order"
NOT_SAMPLED = "not_sampled_for_mix"
DUPLICATE_ID = "duplicate_id"


def stable_hash(seed: int, purpose: str, source: str, record_id: str) -> int:
    """A 64-bit hash of (seed, purpose, source, id), the same in every process and on every machine."""
    key = f"{seed}\x1f{purpose}\x1f{source}\x1f{record_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


@dataclasses.dataclass(frozen=True)
class ExampleKey:
    """What the global decisions need to know about one encoded example (small, so cheap to gather)."""
    source: str
    kind: str
    task: str
    id: str

    def rank(self, seed: int, purpose: str) -> tuple[int, str, str]:
        """Sort key: the hash, with (source, id) breaking the (astronomically unlikely) ties."""
        return stable_hash(seed, purpose, self.source, self.id), self.source, self.id


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integers summing to `total`, proportional to `weights` (ties broken by name)."""
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / wsum for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


def general_quotas(agent_count: int, eta: float, pools: dict[str, int],
                   weights: dict[str, float] | None) -> dict[str, int]:
    """How many examples to draw from each general source (see the module docstring)."""
    if eta >= 1.0 or not pools:
        return {k: 0 for k in pools}
    if eta <= 0.0 or agent_count == 0:
        return dict(pools)  # no agent data in the mix: all general data
    wanted = round(agent_count * (1.0 - eta) / eta)
    weights = dict(weights) if weights else {k: float(n) for k, n in pools.items()}
    quotas = {k: 0 for k in pools}
    open_sources = {k for k in pools if weights.get(k, 0) > 0}
    remaining = wanted
    while remaining > 0 and open_sources:
        share = largest_remainder(remaining, {k: weights[k] for k in open_sources})
        for k, n in share.items():
            take = min(n, pools[k] - quotas[k])
            quotas[k] += take
            remaining -= take
        open_sources = {k for k in open_sources if quotas[k] < pools[k]}
        if all(n == 0 for n in share.values()):
            break
    return quotas


def _threshold(ranks: list[tuple], k: int):
    """The k-th smallest rank (examples ranked <= it are chosen); None chooses nothing."""
    if k <= 0:
        return None
    return sorted(ranks)[min(k, len(ranks)) - 1]


def validation_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def drop_duplicates(keyed: Iterable[tuple[ExampleKey, tuple[str, int]]]) -> tuple[list[ExampleKey], set[tuple]]:
    """Of examples sharing (source, id), keeps the first in input order (its (file, record number)
    location); returns (the kept keys, {(source, id, file, number)} of the others)."""
    first: dict[tuple[str, str], tuple[tuple[str, int], ExampleKey]] = {}
    duplicates = set()
    for key, location in keyed:
        name = (key.source, key.id)
        if name in first and first[name][0] <= tuple(location):
            duplicates.add((*name, *location))
            continue
        if name in first:
            duplicates.add((*name, *first[name][0]))
        first[name] = (tuple(location), key)
    return [key for _, key in first.values()], duplicates


def make_plan(keys: Iterable[ExampleKey], *, seed: int, eta: float, general_weights: dict[str, float] | None,
              validation_fraction: float, agent_sources: list[str], general_sources: list[str],
              duplicates: set[tuple] = frozenset()) -> dict:
    """The global decisions from the keys of all (de-duplicated) encoded examples: per-source mix
    thresholds (or "all"/"none"), per-task validation thresholds, and the mix's numbers for the manifest.
    `duplicates` (from drop_duplicates) is carried along for the placement step."""
    keys = list(keys)
    by_source: dict[str, list[ExampleKey]] = {s: [] for s in agent_sources + general_sources}
    for key in keys:
        by_source[key.source].append(key)
    agent_pool = sum(len(by_source[s]) for s in agent_sources)
    use_agent = eta > 0.0 or not general_sources
    agent_count = agent_pool if use_agent else 0
    pools = {s: len(by_source[s]) for s in general_sources}
    quotas = general_quotas(agent_count, eta, pools, general_weights)
    mix = {s: ("all" if use_agent else "none") for s in agent_sources}
    for s in general_sources:
        mix[s] = _threshold([k.rank(seed, MIX) for k in by_source[s]], quotas[s])
    general_count = sum(quotas.values())
    total = agent_count + general_count
    achieved = agent_count / total if total else 0.0
    wanted = None
    if 0 < eta < 1 and agent_count:
        wanted = round(agent_count * (1.0 - eta) / eta)
    if wanted is not None and general_count < wanted:
        log.warning("general pool too small for eta=%.3f: %d general examples available, %d wanted; "
                    "eta_achieved=%.4f", eta, general_count, wanted, achieved)
    if general_weights and general_count:
        wsum = sum(general_weights.values())
        off = {s: (quotas[s] / general_count, general_weights[s] / wsum) for s in general_sources
               if abs(quotas[s] - general_count * general_weights[s] / wsum) > 1}
        if off:
            log.warning("general sub-mix differs from the weights (a pool was too small): %s",
                        {s: f"{a:.3f} (wanted {w:.3f})" for s, (a, w) in off.items()})

    selected: dict[str, list[ExampleKey]] = {}
    for key in keys:
        if is_selected(mix, seed, key):
            selected.setdefault(key.task, []).append(key)
    validation = {task: _threshold([k.rank(seed, SPLIT) for k in ks], validation_count(len(ks), validation_fraction))
                  for task, ks in sorted(selected.items())}
    return {
        "seed": seed,
        "duplicates": set(duplicates),
        "mix_threshold": mix,
        "validation_threshold": validation,
        "mix": {
            "eta": eta,
            "eta_achieved": achieved,
            "agent_examples": agent_count,
            "general_examples": general_count,
            "general_wanted": wanted,
            "general_pool": pools,
            "general_weights": general_weights,
            "examples_per_source": {s: (len(by_source[s]) if mix[s] == "all" else 0) for s in agent_sources}
            | {s: quotas[s] for s in general_sources},
        },
    }


def is_selected(mix_threshold: dict, seed: int, key: ExampleKey) -> bool:
    threshold = mix_threshold[key.source]
    if threshold == "all":
        return True
    if threshold is None or threshold == "none":
        return False
    return key.rank(seed, MIX) <= tuple(threshold)


def split_of(plan: dict, key: ExampleKey) -> str:
    threshold = plan["validation_threshold"].get(key.task)
    if threshold is not None and key.rank(plan["seed"], SPLIT) <= tuple(threshold):
        return "validation"
    return "train"


def shard_of(seed: int, key: ExampleKey, num_shards: int) -> int:
    return stable_hash(seed, SHARD, key.source, key.id) % num_shards


def order_key(seed: int, key: ExampleKey) -> tuple[int, str, str]:
    return key.rank(seed, ORDER)
