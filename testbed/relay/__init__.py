"""The relay protocol: wire format, topics, credentials/ACLs, device agent, edge-server orchestrator.

Sockets only (docs/design.md, layers): nothing here touches the kernel or imports `emulation/`;
`testbed/composition/` (the run owner) composes the two.
"""

from testbed.relay import topics
from testbed.relay.wire import Message, TensorSpec, decode, encode

__all__ = ["topics", "Message", "TensorSpec", "decode", "encode"]
