"""Delays packets by a fixed time: the verdicts of an iptables NFQUEUE, given late.

Used where the kernel has no `sch_netem` (netem is the usual way to add delay, and the
harness uses it when present). iptables sends the namespace's outgoing packets to queue N
(`-j NFQUEUE --queue-num N --queue-bypass`); this program, run inside the same network
namespace, receives each packet's id (not its payload) over nfnetlink and accepts it
`--delay-ms` later. The packets themselves never leave the kernel: this is a timer on the
kernel's own forwarding, not a relay. Since the delay is constant, packets leave in the order
they came, so one batch verdict ("accept everything up to id X") releases all that are due.

Speaks the netlink protocol directly (linux/netfilter/nfnetlink_queue.h), no library needed.
"""
import argparse
import collections
import errno
import os
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT_BATCH = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
QUEUE_MAXLEN = 8192


def attr(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def message(msg_type, flags, seq, queue, attrs):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def attributes(data):
    """(type, payload) of each netlink attribute in `data`."""
    at = 0
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4:
            return
        yield kind & 0x3FFF, data[at + 4:at + length]
        at += (length + 3) & ~3


def messages(data):
    """(type, body after the netlink header) of each message in a datagram."""
    at = 0
    while at + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, at)
        if length < 16:
            return
        yield kind, data[at + 16:at + length]
        at += (length + 3) & ~3


class Queue:
    def __init__(self, number):
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0

    def configure(self, attrs):
        self.seq += 1
        self.sock.send(message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, self.seq,
                               self.number, attrs))
        for kind, body in messages(self.sock.recv(65536)):
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                if code != 0:
                    raise OSError(-code, os.strerror(-code))

    def bind(self):
        self.configure([attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND,
                                                        socket.AF_INET))])
        self.configure([attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
                        attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
                        # Past QUEUE_MAXLEN, packets pass undelayed rather than drop.
                        attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)),
                        attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))])

    def accept_through(self, packet_id):
        self.seq += 1
        self.sock.send(message(NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, self.seq, self.number,
                               [attr(NFQA_VERDICT_HDR,
                                     struct.pack("!II", NF_ACCEPT, packet_id))]))

    def packet_ids(self, timeout):
        """Ids of the packets that arrive within `timeout` seconds (at most one datagram)."""
        self.sock.settimeout(max(timeout, 0.0005))
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            return []
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                return []  # the kernel dropped some packet notices; those packets go as well
            raise
        ids = []
        for kind, body in messages(data):
            if kind & 0xFF != NFQNL_MSG_PACKET:
                continue
            for a_kind, payload in attributes(body[4:]):
                if a_kind == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", payload)[0])
        return ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--ready-file", help="created once the queue is bound")
    args = parser.parse_args()
    delay = args.delay_ms / 1000.0
    queue = Queue(args.queue)
    queue.bind()
    if args.ready_file:
        open(args.ready_file, "w").close()
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    held = collections.deque()  # (due time, packet id), in arrival order
    while running[0]:
        now = time.monotonic()
        last_due = None
        while held and held[0][0] <= now:
            last_due = held.popleft()[1]
        if last_due is not None:
            queue.accept_through(last_due)
        wait = held[0][0] - now if held else 0.05
        ids = queue.packet_ids(wait)
        arrived = time.monotonic()
        for packet_id in ids:
            held.append((arrived + delay, packet_id))
    # Leaving: release what is held rather than have the kernel drop it.
    if held:
        queue.accept_through(held[-1][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
