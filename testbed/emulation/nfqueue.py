"""The netfilter queue protocol (nfnetlink_queue) on a raw netlink socket: bind a queue,
read queued packets' ids and headers, give verdicts.

Just the part the delayer needs, in the kernel's own terms (linux/netfilter/nfnetlink_queue.h):
a socket is bound to the network namespace it was created in; each queue is configured
to copy the first `copy_range` bytes of every packet (enough for the IPv4 and TCP/UDP
headers), the packet stays in the kernel until its verdict.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "NETLINK_NETFILTER",
    "NF_DROP",
    "NF_ACCEPT",
    "QueuedPacket",
    "NfQueueSocket",
    "config_message",
    "verdict_message",
    "parse_messages",
    "flow_key",
]

NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_NO_ENOBUFS = 5
_NFNL_SUBSYS_QUEUE = 3
_MSG_PACKET, _MSG_VERDICT, _MSG_CONFIG = 0, 1, 2
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN, _CFG_MASK, _CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND, _CMD_UNBIND = 1, 2
_COPY_PACKET = 2
_CFG_F_GSO = 1 << 2  # hand GSO packets over whole: no software segmentation before queueing
_ATTR_PACKET_HDR, _ATTR_VERDICT_HDR, _ATTR_PAYLOAD = 1, 2, 10
_NLA_TYPE_MASK = 0x3FFF
NF_DROP, NF_ACCEPT = 0, 1
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (the queue number)
_ATTR = struct.Struct("=HH")
COPY_RANGE = 64  # IPv4 header (up to 60 bytes) + the first 4 bytes of TCP/UDP: the ports


@dataclass(frozen=True)
class QueuedPacket:
    queue: int
    packet_id: int
    head: bytes  # the first COPY_RANGE bytes of the IP packet


def _attr(kind: int, payload: bytes) -> bytes:
    n = _ATTR.size + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int, seq: int = 0) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _HDR.pack(_HDR.size + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def config_message(queue: int, seq: int, *, bind: bool = True, maxlen: int = 8192) -> bytes:
    """Bind (or unbind) `queue`, copy COPY_RANGE bytes of each packet, hold up to `maxlen`."""
    cmd = _attr(_CFG_CMD, struct.pack("!BBH", _CMD_BIND if bind else _CMD_UNBIND, 0, socket.AF_INET))
    if not bind:
        return _message(_MSG_CONFIG, queue, cmd, _NLM_F_REQUEST | _NLM_F_ACK, seq)
    attrs = (cmd + _attr(_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, _COPY_PACKET))
             + _attr(_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
             + _attr(_CFG_MASK, struct.pack("!I", _CFG_F_GSO)) + _attr(_CFG_FLAGS, struct.pack("!I", _CFG_F_GSO)))
    return _message(_MSG_CONFIG, queue, attrs, _NLM_F_REQUEST | _NLM_F_ACK, seq)


def verdict_message(queue: int, packet_id: int, verdict: int = NF_ACCEPT) -> bytes:
    return _message(_MSG_VERDICT, queue, _attr(_ATTR_VERDICT_HDR, struct.pack("!II", verdict, packet_id)),
                    _NLM_F_REQUEST)


def parse_messages(buf: bytes) -> Iterator[QueuedPacket | tuple[int, int]]:
    """Queued packets, and (seq, errno) for netlink acknowledgements (errno 0 = success).

    Hot path of the delayer (one call per packet): attributes are walked inline."""
    off, end = 0, len(buf)
    packet_type = (_NFNL_SUBSYS_QUEUE << 8) | _MSG_PACKET
    while off + 16 <= end:
        length, mtype, _flags, seq, _pid = _HDR.unpack_from(buf, off)
        if length < 16:
            return
        if mtype == packet_type:
            queue = (buf[off + 18] << 8) | buf[off + 19]
            packet_id, head = None, b""
            a, stop = off + 20, off + length
            while a + 4 <= stop:
                n, kind = _ATTR.unpack_from(buf, a)
                if n < 4:
                    break
                kind &= _NLA_TYPE_MASK
                if kind == _ATTR_PACKET_HDR:
                    packet_id = int.from_bytes(buf[a + 4:a + 8], "big")
                elif kind == _ATTR_PAYLOAD:
                    head = buf[a + 4:a + n]
                a += (n + 3) & ~3
            if packet_id is not None:
                yield QueuedPacket(queue, packet_id, head)
        elif mtype == _NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", buf, off + 16)
            yield seq, -code
        off += (length + 3) & ~3


def flow_key(head: bytes) -> bytes:
    """Protocol, addresses and (TCP/UDP) ports of an IPv4 packet: what keeps a flow in order."""
    if len(head) < 20:
        return head
    ihl = (head[0] & 0x0F) * 4
    ports = head[ihl:ihl + 4] if head[9] in (6, 17) else b""
    return head[9:10] + head[12:20] + ports


class NfQueueSocket:
    """One nfnetlink queue socket, in the namespace the calling thread is in when it is made."""

    def __init__(self, rcvbuf_bytes: int = 16 << 20):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf_bytes)  # SO_RCVBUFFORCE: root may exceed rmem_max
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def configure(self, queue: int, *, bind: bool = True) -> None:
        """Bind/unbind a queue and wait for the kernel's answer (OSError on refusal)."""
        self._seq += 1
        seq = self._seq
        self.sock.setblocking(True)
        self.sock.settimeout(5.0)
        try:
            self.sock.send(config_message(queue, seq, bind=bind))
            while True:
                for item in parse_messages(self.sock.recv(65536)):
                    if isinstance(item, tuple) and item[0] == seq:
                        if item[1]:
                            raise OSError(item[1], f"nfqueue {queue}: {os.strerror(item[1])}")
                        return
        finally:
            self.sock.setblocking(False)

    def read(self, budget: int = 256) -> list[QueuedPacket]:
        """Packets waiting on the socket now (at most `budget` datagrams), without blocking."""
        out: list[QueuedPacket] = []
        for _ in range(budget):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the socket overflowed; those packets are lost
                    continue
                raise
            out.extend(p for p in parse_messages(data) if isinstance(p, QueuedPacket))
        return out

    def accept(self, packets: list[tuple[int, int]]) -> None:
        """Accept (queue, packet id) pairs: one datagram holds many verdict messages."""
        chunk = 200  # 32-byte messages: well under a page per datagram
        for i in range(0, len(packets), chunk):
            self.sock.send(b"".join(verdict_message(q, pid) for q, pid in packets[i:i + chunk]))

    def close(self) -> None:
        self.sock.close()
