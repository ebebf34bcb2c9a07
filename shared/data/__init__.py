"""Datasets and federated partitioning for spikefed.

`load_dataset(name, split, data_dir)` gives a `TensorDataset(x, y)`: `x` float32
`[N, C, H, W]` in [0, 1] (event datasets such as `dvs-digits`: binary frames `[N, T, C, H, W]`),
`y` int64 class ids; `nmnist` and `dvs-gesture` read real recordings framed by a `Framing`
(`shared.data.recordings`). `dataset_info(name)` gives its channels, class
count and image size without loading it. `partition_indices(labels, num_partitions,
partition_id, scheme=..., alpha=..., seed=...)` gives the sorted sample indices one federated
client trains on (IID or Dirichlet non-IID, via flwr-datasets). All failures raise
`DatasetError` (a `ValueError`) with a one-line message saying how to fix them.

Importing this package is cheap: it does not import flwr, flwr-datasets / Hugging Face
`datasets`, mlxtend or scikit-learn; those load on first use.
"""

from __future__ import annotations

from shared.data.errors import DatasetError
from shared.data.loaders import KNOWN_DATASETS, DatasetInfo, dataset_info, load_dataset
from shared.data.partition import SCHEMES, partition_indices
from shared.data.recordings import Framing

__all__ = [
    "KNOWN_DATASETS",
    "SCHEMES",
    "DatasetError",
    "DatasetInfo",
    "Framing",
    "dataset_info",
    "load_dataset",
    "partition_indices",
]
