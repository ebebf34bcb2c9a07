"""`client.byzantine:app`: the honest ClientApp behind a mod that makes chosen nodes byzantine.

For research on robust aggregation only: `spikefed-run --byzantine K --byzantine-kind KIND` runs
this component instead of `client.app:app` and adds `byzantine-nodes` / `byzantine-kind` to the
train config. The mod removes them, lets the honest handler train and reply, and on nodes with
partition-id < K replaces the update by `shared.byzantine.corrupt_delta` in the same uplink format.
Evaluation and every other node stay honest.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client import app as honest
from shared import reply
from shared.byzantine import KIND_KEY, NODES_KEY, corrupt_delta


def reply_delta(
    msg: Message, received: dict[str, torch.Tensor], bits: int
) -> dict[str, torch.Tensor]:
    """The update an honest train reply carries (its weights minus `received`)."""
    arrays = {name: array.numpy() for name, array in msg.content[reply.ARRAYS].items()}
    scales = dict(msg.content[reply.SCALES]) if bits != reply.FULL_PRECISION else None
    base = {name: t.numpy() for name, t in received.items()}
    deltas = reply.decode(arrays, scales, base, bits)
    return {name: torch.from_numpy(delta) for name, delta in deltas.items()}


def byzantine_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Strip the byzantine settings, run the honest handler, corrupt the reply on chosen nodes."""
    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content:
        return call_next(msg, context)
    config = msg.content[reply.CONFIG]
    nodes = int(config.pop(NODES_KEY, 0))
    kind = str(config.pop(KIND_KEY, "nan"))
    received = msg.content[reply.ARRAYS].to_torch_state_dict()
    answer = call_next(msg, context)
    partition_id = int(context.node_config.get("partition-id", -1))
    if answer.has_error() or not 0 <= partition_id < nodes:
        return answer
    bits = int(config["update-bits"])
    seed = reply.node_seed(int(config.get("seed", 0)), int(config.get("server-round", 0)),
                           partition_id)
    generator = torch.Generator().manual_seed(seed)
    delta = corrupt_delta(reply_delta(answer, received, bits), kind, generator)
    state = {name: received[name].float() + delta[name] for name in received}
    for key, record in honest.update_records(state, received, bits).items():
        answer.content[key] = record
    return answer


app = ClientApp(mods=[byzantine_mod])
app.train()(honest.train)
app.evaluate()(honest.evaluate)
