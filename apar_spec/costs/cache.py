"""Cost files: their key (model shape fingerprint, dtype, device, threads), the measured
costs they hold, and reading/writing them (``$XDG_CACHE_HOME/apar-spec/costs/``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # new nodes per pass that get measured
HEAD_ROWS = (1, 2, 4, 8, 16)  # hidden states the heads read per step (one per live branch)
DEFAULT_HEADS = 4
# cache lengths measured (interpolated between): a short prompt, and a prompt plus a few hundred tokens
DEFAULT_CONTEXTS = (64, 512)
# Packed forwards of ``rows`` requests feeding ``new`` nodes each over BATCH_CONTEXT slots: what a
# loaded step costs at a batch size (``ModelCosts.batch``, read by load-adaptive speculation)
BATCH_ROWS = (1, 2, 4, 8, 16, 32)
BATCH_NEW = (1, 2, 3, 5, 9)
BATCH_CONTEXT = 256
CACHE_VERSION = 2  # 2: passes measured on the paged layout (the decoder's), plus the batch table
KINDS = ("model", "ngram", "heads")
# Live branches per step assumed by "auto" in apar+spec before anything is decoded (the
# embedded APAR answers measured 1.6-3.4; more branches make long drafts costlier).
APAR_BRANCHES_GUESS = 2.0  # speculator kinds the model knows how to cost
# Acceptance assumed when nothing better is known (per-depth probability that the top guess is right).
DEFAULT_ALPHA = {"model": 0.7, "heads": 0.6, "ngram": 0.4}
_SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)

Say = Callable[[str], None]


# ===================================================================== keys and files


@dataclass(frozen=True)
class CostKey:
    """What a cost file is valid for. ``threads`` is None on accelerators."""

    fingerprint: str
    dtype: str
    device: str
    threads: Optional[int]

    def filename(self) -> str:
        dev = self.device.replace(":", "-").replace(" ", "_").replace("/", "_")
        return f"{self.fingerprint}-{self.dtype}-{dev}-t{self.threads if self.threads is not None else 'any'}.json"


def config_fingerprint(config) -> str:
    """Short hash of the config fields that decide what a forward costs (not the weights)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    shape = {k: d.get(k) for k in _SHAPE_KEYS}
    return hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:12]


def device_label(device) -> str:
    """``cpu`` or ``cuda-<gpu name>``: costs measured on one GPU model say nothing about another."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda-{torch.cuda.get_device_name(dev)}"
    return dev.type


def key_for(model, threads: Optional[int] = None) -> CostKey:
    """The cache key of ``model`` as it is loaded now (dtype, device) under ``threads``
    (None = torch's current count on CPU)."""
    dev = model.device
    if dev.type == "cpu":
        threads = threads if threads is not None else torch.get_num_threads()
    else:
        threads = None
    return CostKey(
        config_fingerprint(model.config), str(model.dtype).removeprefix("torch."), device_label(dev), threads
    )


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "apar-spec" / "costs"


class CostCacheError(ValueError):
    """A cost file that cannot be read (corrupt, another version): one line, says what to do."""


# ===================================================================== the measured costs


@dataclass
class Overhead:
    """Decoder work per step outside the target forward, in seconds: ``base + per_branch*b + per_draft*d``."""

    base: float = 0.0
    per_branch: float = 0.0
    per_draft: float = 0.0

    def __call__(self, branches: float, drafted: float) -> float:
        return self.base + self.per_branch * branches + self.per_draft * drafted


@dataclass
class ModelCosts:
    """Measured costs of one model (see the module docstring). Times in seconds."""

    name: str
    key: CostKey
    forward: dict[int, dict[int, float]]  # cache length -> (new nodes in the pass -> seconds), one row
    # requests in the pass -> (new nodes per request -> seconds), BATCH_CONTEXT slots each; empty = unmeasured
    batch: dict[int, dict[int, float]] = field(default_factory=dict)
    overhead: Overhead = field(default_factory=Overhead)
    heads: dict[int, float] = field(default_factory=dict)  # rows read -> seconds for all heads (stand-in)
    num_heads: int = DEFAULT_HEADS
    repeats: int = 0
    measured_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # every model name these costs were asked for
    # draft fingerprint -> extra seconds of this model's first pass after that draft ran
    # ("target") and of the draft's first pass after this model ran ("draft"): see measure_switch
    switch: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def contexts(self) -> list[int]:
        return sorted(self.forward)

    def forward_cost(self, n: float, context: Optional[float] = None) -> float:
        """Seconds of a pass with ``n`` new nodes over ``context`` cached slots (None = the
        shortest measured): piecewise linear in ``n`` between measured sizes (linear past the
        largest), then linear in the cache length between (and beyond) the measured ones."""
        ctxs = self.contexts
        if context is None or len(ctxs) == 1:
            return _interp(self.forward[ctxs[0]], n)
        lo, hi = (
            (ctxs[0], ctxs[1])
            if context <= ctxs[1]
            else next(((a, b) for a, b in zip(ctxs, ctxs[1:]) if context <= b), (ctxs[-2], ctxs[-1]))
        )
        a, b = _interp(self.forward[lo], n), _interp(self.forward[hi], n)
        return max(min(a, b) * 0.5, a + (b - a) * (context - lo) / (hi - lo))

    def batch_cost(self, rows: float, per_row: float) -> float:
        """Seconds of one packed pass of ``rows`` requests feeding ``per_row`` new nodes each:
        piecewise linear in both between the measured points (linear past the largest). Without a
        batch table, the one-row curve at ``rows * per_row`` nodes (what the pass feeds)."""
        if not self.batch:
            return self.forward_cost(rows * per_row)
        counts = sorted(self.batch)
        if len(counts) == 1 or rows <= counts[0]:
            return _interp(self.batch[counts[0]], per_row) * (rows / counts[0] if rows < counts[0] else 1.0)
        lo, hi = next(((a, b) for a, b in zip(counts, counts[1:]) if rows <= b), (counts[-2], counts[-1]))
        a, b = _interp(self.batch[lo], per_row), _interp(self.batch[hi], per_row)
        return max(0.0, a + (b - a) * (rows - lo) / (hi - lo))

    def heads_cost(self, rows: float) -> float:
        if not self.heads:
            raise CostCacheError(
                f"costs of {self.name} hold no heads measurement; run `apar-spec costs measure --model {self.name}`"
            )
        return _interp(self.heads, rows)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["forward"] = {str(c): {str(k): v for k, v in t.items()} for c, t in self.forward.items()}
        d["heads"] = {str(k): v for k, v in self.heads.items()}
        d["batch"] = {str(r): {str(k): v for k, v in t.items()} for r, t in self.batch.items()}
        d["version"] = CACHE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelCosts:
        if not isinstance(d, dict) or d.get("version") != CACHE_VERSION:
            raise CostCacheError(
                f"cost file version {d.get('version') if isinstance(d, dict) else '?'} is not {CACHE_VERSION}"
            )
        forward = {int(c): {int(k): float(v) for k, v in t.items()} for c, t in d["forward"].items()}
        if not forward or any(
            not t or any(v <= 0 or not math.isfinite(v) for v in t.values()) for t in forward.values()
        ):
            raise CostCacheError("cost file holds no valid forward timings")
        return cls(
            name=str(d["name"]),
            key=CostKey(**d["key"]),
            forward=forward,
            batch={int(r): {int(k): float(v) for k, v in t.items()} for r, t in d.get("batch", {}).items()},
            overhead=Overhead(**d.get("overhead", {})),
            heads={int(k): float(v) for k, v in d.get("heads", {}).items()},
            num_heads=int(d.get("num_heads", DEFAULT_HEADS)),
            repeats=int(d.get("repeats", 0)),
            measured_at=str(d.get("measured_at", "")),
            versions=dict(d.get("versions", {})),
            names=list(d.get("names", [])),
            switch={str(k): {str(a): float(b) for a, b in v.items()} for k, v in d.get("switch", {}).items()},
        )


def _interp(table: dict[int, float], x: float) -> float:
    xs = sorted(table)
    if len(xs) == 1:
        return table[xs[0]] * max(x, 1) / xs[0]
    if x <= xs[0]:
        return table[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if x <= hi:
            return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)
    lo, hi = xs[-2], xs[-1]
    slope = max(0.0, (table[hi] - table[lo]) / (hi - lo))
    return table[hi] + slope * (x - hi)


# ===================================================================== cache I/O


def save(costs: ModelCosts, directory: Optional[Path] = None) -> Path:
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / costs.key.filename()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(costs.to_dict(), indent=1))
    tmp.replace(path)  # a crash mid-write never leaves half a file under the real name
    return path


def load_costs(key: CostKey, directory: Optional[Path] = None) -> Optional[ModelCosts]:
    """Cached costs for ``key``; None if never measured; :class:`CostCacheError` if the file is bad."""
    path = (directory or cache_dir()) / key.filename()
    if not path.exists():
        return None
    try:
        costs = ModelCosts.from_dict(json.loads(path.read_text()))
    except CostCacheError as err:
        raise CostCacheError(
            f"cost cache file {path} is unusable ({err}); delete it or run `apar-spec costs measure` again"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        what = type(err).__name__ if not str(err) else str(err).splitlines()[0]
        raise CostCacheError(
            f"cost cache file {path} is corrupt ({what}); delete it or run `apar-spec costs measure` again"
        ) from None
    if costs.key != key:
        raise CostCacheError(f"cost cache file {path} holds costs for another setup; delete it or measure again")
    return costs


def all_costs(directory: Optional[Path] = None) -> list[tuple[Path, Optional[ModelCosts], Optional[str]]]:
    """Every cost file: (path, costs or None, error or None)."""
    directory = directory or cache_dir()
    out: list[tuple[Path, Optional[ModelCosts], Optional[str]]] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out.append((path, ModelCosts.from_dict(json.loads(path.read_text())), None))
        except Exception as err:  # noqa: BLE001 - listing must show every file, good or bad
            out.append((path, None, f"unreadable ({type(err).__name__})"))
    return out


def find_costs(
    name: str, dtype: str, device: str, threads: Optional[int], directory: Optional[Path] = None
) -> Optional[ModelCosts]:
    """Cached costs of the model a benchmark row names, or None. The model's config (read
    offline: embedded name, folder or cached id) gives the fingerprint; failing that, a cost
    file that lists ``name`` for the same dtype, device kind and threads is used."""
    dev = torch.device(device) if device else torch.device("cpu")
    label = device_label(dev) if dev.type != "cuda" or torch.cuda.is_available() else None
    key_threads = threads if dev.type == "cpu" else None
    fp = _fingerprint_of_name(name)
    if fp and label:
        costs = load_costs(CostKey(fp, dtype, label, key_threads), directory)
        if costs is not None:
            return costs
    for _, costs, _err in all_costs(directory):
        if costs is None or name not in costs.names:
            continue
        k = costs.key
        if k.dtype == dtype and k.device.split("-")[0] == dev.type and k.threads == key_threads:
            return costs
    return None


def _fingerprint_of_name(name: str) -> Optional[str]:
    try:
        from transformers import AutoConfig

        from apar_spec.models.loading import EMBEDDED, embedded_dir

        path = Path(name).expanduser()
        source = str(embedded_dir(name)) if name in EMBEDDED else str(path.parent if path.suffix == ".gguf" else name)
        return config_fingerprint(AutoConfig.from_pretrained(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - no config here: fall back to the names the cost files list
        return None
