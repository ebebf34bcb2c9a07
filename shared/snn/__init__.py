"""Spiking neural networks: multi-step IF/LIF neurons, surrogate gradients and the model zoo.

    from shared.snn import build_model, SURROGATES
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=28, time_steps=4)
    logits = model(images)          # [B, 1, 28, 28] in [0, 1] -> [B, 10], averaged over T
"""

from .inference import dataset_tensors, evaluate_model, predict
from .models import (
    MODELS,
    SpikingNet,
    build_model,
    federated_state,
    load_federated_state,
    model_layout,
    over_time,
)
from .neuron import IF, LIF, multistep_reference, spike_density, spiking_neurons
from .surrogate import SURROGATES, Surrogate, get_surrogate

__all__ = [
    "IF",
    "LIF",
    "MODELS",
    "SURROGATES",
    "SpikingNet",
    "Surrogate",
    "build_model",
    "dataset_tensors",
    "evaluate_model",
    "federated_state",
    "get_surrogate",
    "load_federated_state",
    "model_layout",
    "multistep_reference",
    "over_time",
    "predict",
    "spike_density",
    "spiking_neurons",
]
