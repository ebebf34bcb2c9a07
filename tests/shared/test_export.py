"""shared.export: NIR graphs of zoo models, read back by us and by peer simulators.

The peers' importers (SpikingJelly 2.0, Norse 1.1, snnTorch 1.0; the `interop` extra) run the
exported graph step by step on 1,000 mnist-subset test images; their time-averaged outputs are
compared with `from_nir`'s logits bit for bit. Each importer needs a few adjustments after import
(the `_sj`, `_norse`, `_snntorch` helpers); README's interop table lists them.
"""

from __future__ import annotations

import copy

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.checkpoint import save_checkpoint
from shared.data import load_dataset
from shared.export import DT, ExportError, cli, from_nir, read_nir, to_nir, write_nir
from shared.quant import quantize
from shared.quant.fake import fake_quant_weight
from shared.snn import build_model, federated_state
from shared.snn.neuron import LIF

T = 4


def _train(name: str, neuron: str = "lif", steps: int = 40) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, input_size=28, time_steps=T,
                        neuron=neuron).train()
    x, y = load_dataset("mnist-subset", "train").tensors
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"csnn": _train("csnn"), "mlp": _train("mlp"), "mlp-if": _train("mlp", "if")}


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_dataset("mnist-subset", "test").tensors
    assert len(y) == 1000
    return x, y


def _with_reset(model: torch.nn.Module, reset: str) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, LIF):
            m.reset = reset
    return model


def _steps(net, x: torch.Tensor, call) -> torch.Tensor:
    """Run an imported stateful graph T steps on direct-coded x; the outputs averaged over T."""
    outs, state = [], None
    with torch.no_grad():
        for _ in range(T):
            y, state = call(net, x, state)
            outs.append(y)
    return torch.stack(outs).mean(0)


# --- our own round trip ---------------------------------------------------------------------


def test_graph_holds_the_folded_layers_and_the_neuron_constants(models):
    model = models["csnn"]
    graph = to_nir(model)
    assert [type(graph.nodes[n]).__name__ for n in ("conv1", "sn1", "pool1", "flatten", "fc")] \
        == ["Conv2d", "LIF", "AvgPool2d", "Flatten", "Affine"]
    bn = model.bn1
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = (model.conv1.weight.double() * scale.view(-1, 1, 1, 1)).float()
    assert np.array_equal(graph.nodes["conv1"].weight, expected.detach().numpy())
    bias = (bn.bias.double() - bn.running_mean.double() * scale).float()
    assert np.array_equal(graph.nodes["conv1"].bias, bias.detach().numpy())
    lif = graph.nodes["sn1"]  # decay 0.5: tau = 2 dt, r = tau / dt = 2
    assert lif.tau.shape == (16, 28, 28)
    assert np.all(lif.tau == np.float32(2 * DT)) and np.all(lif.r == 2.0)
    assert np.all(lif.v_leak == 0) and np.all(lif.v_threshold == 1.0) and np.all(lif.v_reset == 0)
    meta = graph.metadata
    assert meta["time_steps"] == T and meta["dt"] == DT and meta["reset_mode"] == "subtract"
    for key in ("firing", "readout", "input_coding", "weight_bits", "batchnorm", "model"):
        assert key in meta
    if_graph = to_nir(models["mlp-if"])
    assert isinstance(if_graph.nodes["sn1"], nir.IF) and np.all(if_graph.nodes["sn1"].r == 1 / DT)


@pytest.mark.parametrize("name", ["csnn", "mlp", "mlp-if"])
def test_from_nir_file_reproduces_the_models_logits(models, test_images, tmp_path, name):
    model, (x, y) = models[name], test_images
    path = write_nir(to_nir(model), tmp_path / "model.nir")
    rebuilt = from_nir(read_nir(path))
    with torch.no_grad():
        ours, theirs = model(x), rebuilt(x)
    assert torch.equal(theirs, from_nir(to_nir(model))(x))  # the file loses nothing
    # BN folding rounds differently from conv-then-BN; spikes may flip on rare inputs
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.995
    assert (ours - theirs).abs().max() < 0.1
    assert (theirs.argmax(1) == y).float().mean() > 0.5  # a trained model, not a trivial one


def test_sum_pooling_folds_the_quarter_into_the_next_layer_exactly(models, test_images):
    model, x = models["csnn"], test_images[0][:200]
    avg, total = to_nir(model), to_nir(model, pooling="sum")
    assert isinstance(total.nodes["pool1"], nir.SumPool2d)
    assert np.array_equal(total.nodes["conv2"].weight, avg.nodes["conv2"].weight * 0.25)
    assert torch.equal(from_nir(total)(x), from_nir(avg)(x))


def test_qat_model_exports_its_fake_quantized_weights(models):
    qat = quantize(models["mlp"], bits=4).eval()
    graph = to_nir(qat)
    assert graph.metadata["weight_bits"] == 4
    expected = fake_quant_weight(qat.fc2.weight, 4).detach().numpy()  # fc2 has no BN
    assert np.array_equal(graph.nodes["fc2"].weight, expected)
    assert len(np.unique(expected[0])) <= 15  # 4-bit codes x one power-of-two scale per row
    twin = copy.deepcopy(models["mlp"])
    with torch.no_grad():
        for layer in (twin.fc1, twin.fc2):
            layer.weight.copy_(fake_quant_weight(layer.weight, 4))
    plain = to_nir(twin)
    for node in ("fc1", "fc2"):
        assert np.array_equal(graph.nodes[node].weight, plain.nodes[node].weight)


def test_unsupported_models_and_nodes_are_one_line_errors():
    resnet = build_model("resnet-mini", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    with pytest.raises(ExportError, match="csnn and mlp"):
        to_nir(resnet)
    graph = nir.NIRGraph.from_list(nir.Input(np.array([4])), nir.CubaLIF(
        tau_syn=np.ones(4), tau_mem=np.ones(4), r=np.ones(4), v_leak=np.zeros(4),
        v_threshold=np.ones(4)), nir.Output(np.array([4])))
    with pytest.raises(ExportError, match="unsupported NIR node CubaLIF"):
        from_nir(graph, time_steps=2)


# --- the command ----------------------------------------------------------------------------


def test_export_command_writes_a_graph_of_the_checkpoint(invoke, tmp_path, models):
    from shared.config import RunConfig

    config = RunConfig.parse({"weight-bits": 32, "time-steps": T, "model": "mlp"})
    ckpt = save_checkpoint(tmp_path / "round-001.safetensors", federated_state(models["mlp"]),
                           {"round": 1, "model": config.model_spec(), "config": config.to_flwr()})
    out = invoke(cli, str(ckpt), "--format", "nir", "--out", str(tmp_path / "m.nir"))
    assert out.code == 0, out.stderr
    x = load_dataset("mnist-subset", "test").tensors[0][:100]
    with torch.no_grad():
        assert (from_nir(tmp_path / "m.nir")(x).argmax(1) == models["mlp"](x).argmax(1)).all()


@pytest.mark.parametrize("args, message", [
    (["missing.safetensors"], "does not exist"),
    (["{bad}"], "metadata"),
    (["{bad}", "--format", "onnx"], "unknown --format 'onnx'"),
    (["{resnet}"], "only the csnn and mlp"),
    (["{resnet}", "--pooling", "max"], "unknown --pooling 'max'"),
])
def test_export_command_bad_input_is_one_line_exit_2(invoke, tmp_path, args, message):
    from shared.config import RunConfig

    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    config = RunConfig.parse({"weight-bits": 32, "model": "resnet-mini", "dataset": "digits"})
    resnet = build_model(**{k: v for k, v in config.model_spec().items() if k != "weight_bits"})
    save_checkpoint(tmp_path / "resnet.safetensors", federated_state(resnet),
                    {"round": 1, "model": config.model_spec(), "config": config.to_flwr()})
    args = [a.format(bad=tmp_path / "bad.safetensors", resnet=tmp_path / "resnet.safetensors")
            for a in args]
    out = invoke(cli, *args, "--out", str(tmp_path / "m.nir"))
    assert out.code == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "error:" in out.stderr
    assert message in out.stderr
    assert not (tmp_path / "m.nir").exists()


# --- peers ----------------------------------------------------------------------------------


def _sj(graph, reset: str):
    """SpikingJelly 2.0: import with our dt; for reset by subtraction set v_reset = None (its
    soft reset). It fires on >= like us, keeps AvgPool2d, reads Flatten without the batch."""
    from spikingjelly.activation_based import neuron
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    net = import_from_nir(graph, dt=DT)
    for m in net.modules():
        if isinstance(m, neuron.BaseNode) and reset == "subtract":
            m.v_reset = None
    return net, lambda n, x, s: n(x, s)


def _norse(graph, reset: str):
    """Norse 1.1 (SumPool2d graph: it has no AvgPool2d): its importer ignores r, so r is folded
    into the synaptic layer before each LIF; it fires on v > v_th, so v_th is lowered to the
    next float32 below; its Flatten counts the batch dimension (start_dim 0 -> 1); for reset by
    subtraction each LIF cell's reset method becomes `reset_subtract` (Norse's IF cell has no
    reset method: IF with reset by subtraction cannot be imported exactly)."""
    import norse.torch as norse
    from norse.torch.functional.reset import reset_subtract

    graph = copy.deepcopy(graph)
    before = {dst: src for src, dst in graph.edges}
    for name, node in graph.nodes.items():
        if isinstance(node, nir.LIF):
            synapse = graph.nodes[before[name]]
            r = node.r.flat[0]  # one value for all neurons
            synapse.weight, synapse.bias = synapse.weight * r, synapse.bias * r
            node.r = np.ones_like(node.r)
        if isinstance(node, (nir.LIF, nir.IF)):
            node.v_threshold = np.nextafter(node.v_threshold, np.float32(-np.inf))
    net = norse.from_nir(graph, dt=DT, ignore_warnings=True)
    for m in net.modules():
        if isinstance(m, torch.nn.Flatten):
            m.start_dim = 1
        if reset == "subtract" and hasattr(getattr(m, "p", None), "reset_method"):
            m.p = m.p._replace(reset_method=reset_subtract)
    return net, lambda n, x, s: n(x, s)


@pytest.mark.parametrize("name", ["csnn", "mlp", "mlp-if"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_spikingjelly_reproduces_our_logits_bit_for_bit(models, test_images, name, reset):
    model = _with_reset(models[name], reset)
    graph, x = to_nir(model), test_images[0]
    ours = from_nir(graph)(x)
    net, call = _sj(graph, reset)
    assert torch.equal(_steps(net, x, call), ours)


@pytest.mark.parametrize("name", ["csnn", "mlp"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_norse_reproduces_our_logits_bit_for_bit(models, test_images, name, reset):
    model = _with_reset(models[name], reset)
    graph, x = to_nir(model, pooling="sum"), test_images[0]
    ours = from_nir(graph)(x)
    net, call = _norse(graph, reset)
    assert torch.equal(_steps(net, x, call), ours)


def test_norse_if_is_exact_with_reset_to_zero_only(models, test_images):
    x = test_images[0]
    zero = to_nir(_with_reset(models["mlp-if"], "zero"), pooling="sum")
    net, call = _norse(zero, "zero")
    assert torch.equal(_steps(net, x, call), from_nir(zero)(x))
    subtract = to_nir(models["mlp-if"], pooling="sum")  # IAF resets to v_reset, whatever we say
    net, call = _norse(subtract, "subtract")
    assert not torch.equal(_steps(net, x, call), from_nir(subtract)(x))


def _snntorch(graph):
    """snnTorch 1.0: its importer fixes dt = 1e-4 s (export with dt=1e-4) and computes
    beta = 1 - dt / tau in float64 from the float32 tau (0.50000002 for our 0.5), so beta is set
    back to the graph's decay (metadata); it fires on mem > threshold, so the threshold is
    lowered to the next float32 below; it maps LIF to a Leaky that resets to zero (reset by
    subtraction: not exact, its Leaky applies the reset one step late) and IF to a Leaky with
    beta 0.9 that asserts r == 1 (unusable); its Flatten counts the batch dimension
    (start_dim 0 -> 1); the hidden state lives in the modules (reset_hidden before a batch)."""
    import json

    import snntorch
    from snntorch.import_nir import import_from_nir

    decay = json.loads(graph.metadata["model"])["decay"]
    net = import_from_nir(copy.deepcopy(graph))
    for m in net.modules():
        if isinstance(m, torch.nn.Flatten):
            m.start_dim = 1
        if isinstance(m, snntorch.Leaky):
            m.beta = torch.full_like(m.beta, decay)
            m.threshold = torch.as_tensor(np.nextafter(np.float32(m.threshold), np.float32(0)))
            m.reset_hidden()
    return net, lambda n, x, s: (n(x)[0], None)


@pytest.mark.parametrize("name", ["csnn", "mlp"])
def test_snntorch_reproduces_a_reset_to_zero_lif_model_bit_for_bit(models, test_images, name):
    graph = to_nir(_with_reset(models[name], "zero"), dt=1e-4)
    x = test_images[0]
    net, call = _snntorch(graph)
    assert torch.equal(_steps(net, x, call), from_nir(graph)(x))


def test_neuron_reset_key_builds_models_that_reset_to_zero():
    from shared.config import RunConfig
    from shared.rebuild import build_from_spec

    spec = RunConfig.parse({"neuron-reset": "zero", "weight-bits": 32}).model_spec()
    assert spec["reset"] == "zero"
    model = build_from_spec(spec)
    assert {m.reset for m in model.modules() if isinstance(m, LIF)} == {"zero"}
    assert to_nir(model).metadata["reset_mode"] == "zero"
    assert "reset" not in RunConfig.parse({}).model_spec()  # default specs are unchanged
