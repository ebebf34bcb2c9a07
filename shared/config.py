"""The validated run configuration shared by the server and the clients.

Keys are Flower's kebab-case run-config keys (`[tool.flwr.app.config]` in pyproject.toml, overridden
with `--run-config "key=value ..."`). `RunConfig.parse` turns a raw mapping into a frozen model and
fails with a `ConfigError` whose one-line message names the key, the bad value and what is allowed.
The server resolves the config once and sends it to the clients in every message's ConfigRecord, so
a client never reads pyproject.toml.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import ConfigError

# node seeds are seed * 1_000_003 + ... (shared.reply.node_seed) and must stay inside torch's and
# numpy's seed range (0..2**63 - 1, 0..2**32 - 1 for the legacy API): 32 bits keep both
MAX_SEED = 2**32 - 1


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Every run parameter, with its default. Field `x_y` is run-config key `x-y`."""

    # strict: `true` is not the number 1 nor `1.0` a count; no inf or nan anywhere (a timeout,
    # a learning rate or a norm bound of inf means nothing)
    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True, strict=True,
        allow_inf_nan=False,
    )

    # federation
    num_server_rounds: int = Field(10, ge=1, description="federated rounds")
    strategy: Literal[
        "fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"
    ] = "fedavg"
    min_clients: int = Field(2, ge=1, description="nodes that must be connected before a round")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of nodes sampled a round")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="nodes asked to evaluate")
    min_nodes: int = Field(2, ge=1, description="fewest replies that still update the model")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies")
    node_wait_timeout: float = Field(
        600.0, gt=0, description="seconds a round waits for too few connected devices before "
        "the run ends (exit 1, checkpoints kept for --resume)"
    )
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal term weight")
    trimmed_beta: float = Field(0.2, gt=0, lt=0.5, description="FedTrimmedAvg cut per side")
    krum_malicious: int = Field(
        1, ge=0, description="Krum, Multi-Krum, Bulyan: tolerated malicious nodes"
    )
    server_lr: float = Field(0.01, gt=0, description="FedAdam server learning rate (eta)")
    # the uplink and what the server accepts from it (server.validation)
    update_bits: Literal[2, 3, 4, 5, 6, 7, 8, 32] = Field(
        8, description="bits per code of the compressed update; 32 = send float32 weights"
    )
    max_update_norm: float = Field(
        0.0, ge=0, description="reject updates whose L2 norm exceeds this; 0 = no limit"
    )
    dp_noise_multiplier: float = Field(
        0.0, ge=0, description="server-side DP: Gaussian noise std / clipping norm"
    )
    dp_clipping_norm: float = Field(
        0.0, ge=0, description="server-side DP: clip each update to this L2 norm; 0 = DP off"
    )
    # data
    dataset: str = "mnist-subset"
    data_dir: str = Field("", description="local directory for datasets that need one")
    partitioning: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0, description="label-skew concentration")
    # framing of real event recordings (nmnist, dvs-gesture; shared.data.recordings)
    event_frames: int = Field(8, ge=1, le=256, description="frames (T) per event recording")
    event_framing: Literal["time", "count"] = Field(
        "time", description="time: T equal time slices; count: T slices of equal event count")
    event_size: int = Field(32, ge=4, le=256, multiple_of=4,
                            description="frame side after downsampling and centre crop / pad")
    # model
    model: Literal["csnn", "mlp", "resnet-mini"] = "csnn"
    neuron: Literal["lif", "if"] = "lif"
    surrogate: Literal["atan", "sigmoid", "triangle", "rectangle"] = "atan"
    neuron_reset: Literal["subtract", "zero"] = Field(
        "subtract", description="after a spike: subtract the threshold, or reset to zero "
        "(NIR's reset: exported graphs then need no reset adjustment in peer simulators)")
    time_steps: int = Field(4, ge=1, le=256)
    weight_bits: Literal[2, 3, 4, 5, 6, 7, 8, 32] = Field(
        4, description="integer weight bits of quantization-aware training; 32 = float"
    )
    train_mode: Literal["snn", "qann"] = Field(
        "snn",
        description="snn: clients train the SNN; qann: clients train the clip-quantize ANN twin "
        "(L = time-steps) and the server converts it to an SNN after the last round",
    )
    # local training
    local_epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.002, gt=0)
    eval_batch_size: int = Field(500, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds every random choice of the run")
    # the simulated neuromorphic chip that accounts every local training step (shared.neurocore)
    chip: str = Field("edge-int8", description="chip preset (shared.neurocore.PRESETS) or none")
    # the arithmetic of the clients' backward pass and update (shared.quant.integer_training)
    train_precision: Literal["auto", "float", "fp16", "int8"] = Field(
        "auto", description="errors, weight gradients and weights in float32, fp16 or int8 "
        "(power-of-two scales, stochastic rounding); auto = the chip preset's precision "
        "(int8 for edge-int8, fp16 for paper-28nm-fp16, float without a chip)")
    # the fleet (shared.fleet): each client a device with its chip, link, energy and availability
    fleet: str = Field("", description="fleet file (TOML, examples in deploy/fleets/); set by "
                       "--fleet; empty = every client the same device, no time or energy model")
    round_deadline_s: float = Field(
        0.0, ge=0, description="simulated seconds a round waits for devices (fleet); replies "
        "that would come later are dropped as stragglers; 0 = no deadline")
    selection: Literal["uniform", "aware"] = Field(
        "uniform", description="which devices train (fleet): uniform (Flower's sampling among "
        "online devices) or aware (expected to meet the deadline and energy, oldest first)")
    # outputs
    out_dir: str = "runs/default"
    # the ServerApp's Prometheus endpoint (server.metrics); port 0 turns it off
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; 0 = off")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address the endpoint binds")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from shared.data import DatasetError, dataset_info

        try:
            dataset_info(name)
        except DatasetError as err:
            raise ValueError(str(err)) from None
        return name

    @field_validator("chip")
    @classmethod
    def _known_chip(cls, name: str) -> str:
        from shared.neurocore import PRESETS

        if name != "none" and name not in PRESETS:
            raise ValueError(f"unknown chip preset; choose one of: {', '.join(PRESETS)}, none")
        return name

    @model_validator(mode="after")
    def _quantizable(self) -> RunConfig:
        if self.weight_bits != 32 and self.model == "resnet-mini":
            raise ValueError("resnet-mini trains in float only: set weight-bits=32")
        return self

    @model_validator(mode="after")
    def _robust_and_private(self) -> RunConfig:
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm == 0:
            raise ValueError("dp-noise-multiplier needs dp-clipping-norm > 0 (the noise scale)")
        needed = 4 * self.krum_malicious + 3
        if self.strategy == "bulyan" and self.min_clients < needed:
            raise ValueError(
                f"bulyan with krum-malicious={self.krum_malicious} needs at least {needed} "
                "clients (4f + 3); add clients or lower krum-malicious"
            )
        return self

    @model_validator(mode="after")
    def _fleet_keys(self) -> RunConfig:
        if not self.fleet and (self.selection != "uniform" or self.round_deadline_s > 0):
            key = "selection" if self.selection != "uniform" else "round-deadline-s"
            raise ValueError(f"{key} needs a fleet of device profiles: pass --fleet FILE.toml "
                             "(examples in deploy/fleets/)")
        return self

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None = None, **overrides: Any) -> RunConfig:
        """Validate a run-config mapping (kebab-case keys) plus keyword overrides."""
        values = {**(raw or {}), **{_kebab(k): v for k, v in overrides.items()}}
        known = {_kebab(name) for name in cls.model_fields}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "see pyproject.toml"
                raise ConfigError(
                    f"run config: unknown key '{key}' ({hint}; "
                    f"known keys: {', '.join(sorted(known))})"
                )
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            if not first["loc"]:  # a rule across keys (model validator)
                message = first["msg"].removeprefix("Value error, ")
                raise ConfigError(f"run config: {message}") from None
            key = ".".join(str(p) for p in first["loc"])
            bad = values.get(key, first.get("input"))
            raise ConfigError(
                f"run config: {key}={bad!r} is not allowed: {first['msg']} "
                f"(fix it with --run-config \"{key}=...\")"
            ) from None

    def resolved_train_precision(self) -> str:
        """`train-precision` with `auto` resolved: what the chip preset computes (int8 and int4
        presets train int8, fp16 presets fp16), float when `chip` is none."""
        if self.train_precision != "auto":
            return self.train_precision
        if self.chip == "none":
            return "float"
        from shared.neurocore import PRESETS

        precision = PRESETS[self.chip].get("precision", "fp16")
        return {"fp32": "float", "fp16": "fp16"}.get(precision, "int8")

    def to_flwr(self) -> dict[str, Any]:
        """The flat kebab-case mapping Flower's ConfigRecord and run config carry."""
        return self.model_dump(by_alias=True)

    def model_spec(self) -> dict[str, Any]:
        """Keyword arguments of `shared.snn.build_model` for this run's dataset and model.

        An event dataset brings its own number of frames, which then overrides `time-steps`
        (that key sets T for direct-coded images)."""
        from shared.data import dataset_info

        info = dataset_info(self.dataset, self.framing())
        return {
            "name": self.model,
            "in_channels": info.in_channels,
            "num_classes": info.num_classes,
            "input_size": info.input_size,
            "time_steps": info.time_steps or self.time_steps,
            "neuron": self.neuron,
            "surrogate": self.surrogate,
            "weight_bits": self.weight_bits,
        } | ({"train_mode": "qann"} if self.train_mode == "qann" else {}) | (
            {"reset": "zero"} if self.neuron_reset == "zero" else {})

    def framing(self):  # -> shared.data.Framing
        """How `nmnist` and `dvs-gesture` recordings become frames (`event-*` keys)."""
        from shared.data import Framing

        return Framing(self.event_frames, self.event_framing, self.event_size)

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.parse(self.to_flwr(), **changes)

