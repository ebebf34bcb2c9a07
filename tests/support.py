"""Builders the suite's tests import (`from support import message, reply, free_port`); the
shared fixtures are in conftest.py."""

from __future__ import annotations

import socket
import time

from flwr.app import Message, Metadata, RecordDict


def message(content: RecordDict, kind: str = "train", *, node: int = 7, round_: int = 1,
            message_id: str | None = None) -> Message:
    """An instruction from the server (node 0) to `node`, as a ServerApp would send it."""
    metadata = Metadata(run_id=1, message_id=message_id or f"m{round_}-{node}", src_node_id=0,
                        dst_node_id=node, reply_to_message_id="", group_id=str(round_),
                        created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


def reply(content: RecordDict, node: int = 1, *, round_: int = 1, kind: str = "train") -> Message:
    """`node`'s reply holding `content` to a fresh instruction of round `round_`."""
    return Message(content, reply_to=message(RecordDict(), kind, node=node, round_=round_))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
