"""Split a dataset among federated clients: which sample indices belong to client `partition_id`.

Two schemes, both computed by flwr-datasets partitioners over a tiny in-memory table
`{"label": labels, "index": 0..N-1}` so that spikefed uses the same, published partitioning
code as other Flower projects:

- `iid`: `IidPartitioner` cuts the table into `num_partitions` contiguous shards (sizes differ
  by at most 1). It does not shuffle, so the rows are first permuted with `seed`.
- `dirichlet`: `DirichletPartitioner` splits every class among the partitions in proportions
  drawn from Dirichlet(`alpha`); small `alpha` (e.g. 0.1) gives skewed, non-IID label
  distributions, large `alpha` approaches IID.

Every client asks for its own partition of the same labels, so the whole partitioning is
computed once per process and cached. flwr-datasets (which imports Hugging Face `datasets`,
slow to import) is imported on first use only.
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared.data.errors import DatasetError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

SCHEMES = ("iid", "dirichlet")
_MIN_PARTITION_SIZE = 10  # samples; lowered for small datasets and retried lower on failure


def partition_indices(
    labels: torch.Tensor | np.ndarray,
    num_partitions: int,
    partition_id: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Sorted int64 indices into the dataset that make up partition `partition_id`.

    `labels` are the dataset's class ids, one per sample. The partitions of
    `0 .. num_partitions - 1` are disjoint and together cover every index exactly once; the
    same arguments always give the same partitions.
    """
    label_array = _as_labels(labels)
    try:
        num_partitions = operator.index(num_partitions)
        partition_id = operator.index(partition_id)
        seed = operator.index(seed)
    except TypeError as e:
        raise DatasetError(f"num_partitions, partition_id and seed must be integers: {e}") from e
    if not 1 <= num_partitions <= len(label_array):
        raise DatasetError(
            f"num_partitions must be between 1 and the number of samples "
            f"({len(label_array)}), got {num_partitions}"
        )
    if not 0 <= partition_id < num_partitions:
        raise DatasetError(
            f"partition_id must be in 0..{num_partitions - 1} for {num_partitions} partitions, "
            f"got {partition_id}"
        )
    if seed < 0:
        raise DatasetError(f"seed must be >= 0, got {seed}")
    if scheme not in SCHEMES:
        raise DatasetError(f"unknown partitioning scheme {scheme!r}; use one of {SCHEMES}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"alpha must be a number, got {alpha!r}") from e
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DatasetError(f"alpha must be a finite number > 0, got {alpha}")
    if scheme == "iid":
        alpha = 0.0  # unused: keep it out of the cache key
    digest = hashlib.sha256(label_array.tobytes()).hexdigest()
    parts = _cached_partitions(digest, num_partitions, scheme, alpha, seed, _Labels(label_array))
    return parts[partition_id].copy()


class _Labels:
    """Carries the label array through `lru_cache` without making it part of the key."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Labels)


@functools.lru_cache(maxsize=32)
def _cached_partitions(
    digest: str, num_partitions: int, scheme: str, alpha: float, seed: int, labels: _Labels
) -> tuple[np.ndarray, ...]:
    """All partitions (sorted index arrays) for one labelling, keyed on the labels' hash."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(labels.array)
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(n)
        table = datasets.Dataset.from_dict({"label": labels.array[order], "index": order})
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = table
        return _read_partitions(partitioner, num_partitions)

    table = datasets.Dataset.from_dict({"label": labels.array, "index": np.arange(n)})
    # The partitioner re-draws (up to 10 times) until every partition holds at least
    # min_partition_size samples, then gives up. Ask for 10, or less when there are few
    # samples per partition, and halve it when the draws still fail (very small alpha).
    min_size = max(1, min(_MIN_PARTITION_SIZE, n // (2 * num_partitions)))
    while True:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
        partitioner.dataset = table
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # one warning per re-draw
                return _read_partitions(partitioner, num_partitions)
        except ValueError as e:
            if min_size == 1:
                raise DatasetError(
                    f"Dirichlet partitioning (alpha={alpha}) of {n} samples into "
                    f"{num_partitions} partitions left some partition empty in every draw; "
                    "use fewer partitions or a larger alpha"
                ) from e
            min_size //= 2


def _read_partitions(partitioner: Partitioner, num_partitions: int) -> tuple[np.ndarray, ...]:
    parts = []
    for pid in range(num_partitions):
        # Slice the whole table at once: `part["index"]` is a lazy column read row by row.
        part = partitioner.load_partition(pid).with_format("numpy")[:]
        indices = np.sort(np.asarray(part["index"], dtype=np.int64))
        indices.flags.writeable = False
        parts.append(indices)
    return tuple(parts)


def _as_labels(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 1-D int64 numpy copy of `labels`."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise DatasetError(
            f"labels must be a 1-D array of integer class ids, got shape {array.shape} "
            f"and dtype {array.dtype}"
        )
    return array.astype(np.int64)
