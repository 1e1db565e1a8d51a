"""One message over Linux TCP on a shaped, delayed, lossy link: a segment-level model,
vectorised over many independent draws. Pure (numpy).

What it follows is the sender the cell runs (emulation/impair.py: Reno once a cell has
impairments; the kernel's defaults for the rest: SACK, RACK-TLP, PRR, a 200 ms minimum
RTO, delayed ACKs, slow start after idle). Time advances in *flights*: the segments one
window sends, each one MSS on the bottleneck (`segment_s`), the next flight leaving when
the first ACK of this one returns (one RTT later) or when the link is free, whichever is
later. Inside a flight every segment is lost on its own with the data direction's loss
probability; positions matter and are kept:

- a loss followed by a delivered segment of the same flight is found by SACK/RACK while
  the flight's ACKs return and repaired in the next flight (retransmissions first); a
  loss at a flight's tail is found one flight later, by the next flight's SACKs;
- the first new-data loss of a window starts one recovery (Reno: ssthresh = cwnd / 2,
  at least 2; cwnd counts the in-order ACKs before the hole). The recovery flight is what
  PRR sends: the new segments the in-order ACKs released before the hole was seen (two
  per ACK in slow start, one in congestion avoidance) plus ssthresh / cwnd of every
  segment delivered after it; then cwnd = ssthresh. A lost retransmission is found again
  by RACK (it is time-ordered) without a second reduction; new data lost during recovery
  makes a second one (Linux leaves recovery, then enters it again);
- growth: slow start +1 segment per delivered segment (delayed ACKs do not slow it: Linux
  counts segments, not ACKs) while the flight uses at least half the window; congestion
  avoidance +1 per window;
- the tail: when the message's last segments are lost and nothing after them arrives, a
  tail loss probe (TLP) fires 2 SRTT after the last ACK (+ the 200 ms minimum RTO when one
  segment is out, + 2 ms otherwise, never later than the RTO); a delayed last ACK (40 ms)
  pushes it back. The probe resends the last segment; its SACK shows the other holes
  (RACK's min_rtt/4 reordering window), which recovery repairs. A lost probe, a lost
  ACK of the probe, or a lost retransmission with nothing sent after it waits for the RTO
  (SRTT + 200 ms, whole jiffies of 4 ms at HZ=250), which resets cwnd to 1 and doubles on
  each further expiry;
- losses in the ACK direction: cumulative ACKs absorb them, except where one ACK carries
  the news alone — the probe's, a timeout retransmission's, the SACKs behind the last
  holes of a message (all of them lost: the holes wait for a timer).

Not modelled: the receive window, queue overflow at the shaper (a single message on a
100 ms queue does not reach it), reordering, spurious-retransmission undo. Jitter is taken
at its upper bound by the caller (the delayer keeps flows in order, so a segment waits for
the slowest earlier one).

With no loss in either direction this is exactly transfer.py's slow-start time (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RTO_MIN_S", "JIFFY_S", "DELAYED_ACK_S", "QUICKACK_SEGMENTS", "TcpPath", "SimOutcome", "simulate",
           "rto_s"]

RTO_MIN_S = 0.200  # TCP_RTO_MIN (net.ipv4.tcp_rto_min_us = 200000)
JIFFY_S = 0.004  # CONFIG_HZ=250: timers run in whole jiffies
TLP_MIN_S = 0.002  # TCP_TIMEOUT_MIN_US added to the probe timeout when several segments are out
DELAYED_ACK_S = 0.040  # TCP_DELACK_MIN / TCP_ATO_MIN (HZ / 25)
QUICKACK_SEGMENTS = 32  # after an idle the receiver acknowledges every segment for 16 ACKs
MIN_SSTHRESH = 2.0


@dataclass(frozen=True)
class TcpPath:
    """One direction of a link as the sender's TCP sees it (seconds, probabilities 0-1)."""

    segments: int  # MSS-sized segments of the message (the last may be partial)
    segment_s: float  # one MSS on the bottleneck
    last_segment_s: float  # the message's last (partial) segment on the bottleneck
    one_way_s: float  # data direction: delay (jitter at its upper bound) + the delayer's pass
    rtt_s: float  # both one-way delays + one segment's time on the bottleneck
    loss_fwd: float  # data segments
    loss_rev: float  # ACKs


@dataclass
class SimOutcome:
    """Per draw: the message's time (first byte sent -> last byte received), the sender's
    window after it, and what the kernel's counters would have counted."""

    time_s: np.ndarray
    cwnd_end: np.ndarray  # segments
    ssthresh_end: np.ndarray  # segments (inf: never reduced)
    retrans_segs: np.ndarray  # TcpRetransSegs (the probes included)
    loss_probes: np.ndarray  # TcpExtTCPLossProbes
    timeouts: np.ndarray  # TcpExtTCPTimeouts
    recoveries: np.ndarray  # TcpExtTCPSackRecovery (fast recoveries entered)


def rto_s(rtt: float) -> float:
    """Linux's RTO after a few clean samples: SRTT + max(RTTVAR, rto_min), whole jiffies."""
    return _jiffies(rtt + RTO_MIN_S)


def _jiffies(x: np.ndarray | float) -> np.ndarray | float:
    return np.ceil(np.asarray(x) / JIFFY_S - 1e-9) * JIFFY_S


class _Draws:
    """The sender's state of every draw (arrays of one length)."""

    def __init__(self, n: int, cwnd0: np.ndarray, ssthresh0: np.ndarray):
        self.t = np.zeros(n)  # when the next flight (or timer) starts from
        self.cwnd = cwnd0.astype(float).copy()
        self.ssth = ssthresh0.astype(float).copy()
        self.w_next = np.maximum(1, np.floor(self.cwnd)).astype(np.int64)
        self.sent = np.zeros(n, np.int64)  # new segments sent
        self.pend = np.zeros(n, np.int64)  # known lost, to resend in the next flight
        self.undet = np.zeros(n, np.int64)  # lost, not yet known (nothing after them arrived)
        self.undet_new = np.zeros(n, bool)  # ... among them new data (a loss of this window)
        self.phase = np.zeros(n, np.int8)  # 0 open, 1 recovery, 2 loss (after an RTO)
        self.high = np.zeros(n, np.int64)  # new segments sent before the current recovery's point
        self.tlp_used = np.zeros(n, bool)
        self.clock_dead = np.zeros(n, bool)  # the last flight's ACKs all lost: only a timer helps
        self.backoff = np.zeros(n, np.int64)
        self.last_deliv = np.zeros(n)  # the latest arrival of a segment at the receiver
        self.last_ack = np.zeros(n)  # the latest ACK at the sender
        self.last_tx = np.zeros(n)  # the latest transmission
        self.active = np.ones(n, bool)
        self.retrans = np.zeros(n, np.int64)
        self.probes = np.zeros(n, np.int64)
        self.timeouts = np.zeros(n, np.int64)
        self.recoveries = np.zeros(n, np.int64)


def simulate(path: TcpPath, cwnd0: np.ndarray, ssthresh0: np.ndarray, rng: np.random.Generator) -> SimOutcome:
    """Draw one message per element of `cwnd0` / `ssthresh0` (the sender's window when the
    message starts, in segments; ssthresh inf on a fresh connection)."""
    cwnd0, ssthresh0 = np.broadcast_arrays(np.asarray(cwnd0, float), np.asarray(ssthresh0, float))
    d = _Draws(cwnd0.size, cwnd0, ssthresh0)
    if path.segments <= 0:
        d.active[:] = False
    for _ in range(100_000):  # each pass moves every active draw by one flight or one timer
        if not d.active.any():
            break
        timer = d.active & (d.pend == 0) & (d.undet > 0) & ((d.sent >= path.segments) | d.clock_dead)
        flight = d.active & ~timer
        if flight.any():
            _flight(d, np.flatnonzero(flight), path, rng)
        if timer.any():
            _timer(d, np.flatnonzero(timer), path, rng)
        d.active &= ~((d.sent >= path.segments) & (d.pend == 0) & (d.undet == 0))
    else:  # pragma: no cover - a bug, not a link
        raise RuntimeError("tcp_sim: a draw did not finish")
    cwnd_end = np.where(d.phase == 1, d.ssth, d.cwnd)  # leaving recovery sets cwnd = ssthresh
    return SimOutcome(d.last_deliv, cwnd_end, d.ssth, d.retrans, d.probes, d.timeouts, d.recoveries)


def _flight(d: _Draws, idx: np.ndarray, path: TcpPath, rng: np.random.Generator) -> None:
    """One window of segments for the draws `idx`: retransmissions first, then new data."""
    n, s, rtt, ow = path.segments, path.segment_s, path.rtt_s, path.one_way_s
    t, phase, cwnd = d.t[idx], d.phase[idx], d.cwnd[idx]
    w = d.w_next[idx]
    k_r = np.minimum(d.pend[idx], w)
    k_n = np.minimum(w - k_r, n - d.sent[idx])
    k = k_r + k_n
    # positions inside the flight, drawn without a matrix: the run of lost segments at its
    # end (P(>= m) = p^m), the last delivered one before it, the first loss before that, and
    # how many of the segments between them are lost (binomial), split at the column from
    # which a loss is new data past the recovery point (it starts a new reduction)
    p = path.loss_fwd
    m = idx.size
    n_tail = np.minimum(k, _run_length(rng, p, m))
    j = k - 1 - n_tail  # last delivered (-1: none)
    any_dlv = j >= 0
    i = np.minimum(np.where(any_dlv, j, 0), _run_length(rng, 1 - p, m))  # first lost before j (j: none)
    lost_first = i < j
    b = np.clip(k_r + np.maximum(d.high[idx] - d.sent[idx], 0), k_r, k)  # first "new episode" column
    lo1, hi1 = i + 1, np.minimum(b, j)
    lo2 = np.maximum(b, i + 1)
    n1 = rng.binomial(np.maximum(hi1 - lo1, 0) * lost_first, p)
    n2 = rng.binomial(np.maximum(j - lo2, 0) * lost_first, p)
    n_det = np.where(lost_first, 1 + n1 + n2, 0)
    det_new = lost_first & ((i >= b) | (n2 > 0))
    tail_new = (n_tail > 0) & (k - 1 >= b)
    dlv = k - n_det - n_tail
    i = np.where(lost_first, i, np.where(n_tail > 0, j + 1, k))  # first lost of the flight
    sent = d.sent[idx] + k_n
    final = sent >= n
    # the SACKs behind the message's last holes: when every one of them is lost, the holes wait for a timer
    after_hole = np.maximum(dlv - np.minimum(i, k), 0)
    unseen = final & (n_det > 0) & (rng.random(idx.size) < path.loss_rev ** np.maximum(after_hole, 1))
    # a timeout's retransmission acknowledged by one ACK alone: lost, the sender learns nothing
    silent = (phase == 2) & any_dlv & (rng.random(idx.size) < path.loss_rev ** np.maximum(dlv, 1))
    # arrivals: segment m of the flight reaches the receiver (m + 1) segment times after the
    # flight starts, plus the one-way delay; the message's last segment may be shorter
    last_is_final = final & (j == k - 1) & (k_n > 0)
    arrive = t + (j + 1) * s + ow - np.where(last_is_final, s - path.last_segment_s, 0.0)
    d.last_deliv[idx] = np.where(any_dlv, np.maximum(d.last_deliv[idx], arrive), d.last_deliv[idx])
    delayed = final & (n_det == 0) & (n_tail > 0) & ((j + 1) % 2 == 1) & (sent > QUICKACK_SEGMENTS)
    ack = t + j * s + rtt + np.where(delayed, DELAYED_ACK_S, 0.0)
    heard = any_dlv & ~silent
    d.last_ack[idx] = np.where(heard, ack, d.last_ack[idx])
    d.last_tx[idx] = t + np.maximum(k - 1, 0) * s
    d.retrans[idx] += k_r
    # what the returning ACKs reveal
    old_undet, old_new = d.undet[idx], d.undet_new[idx]
    seen = np.where(unseen, 0, n_det)
    detected = seen + np.where(heard, old_undet, 0)
    detected_new = (det_new & ~unseen) | (heard & old_new)
    undet = n_tail + np.where(unseen, n_det, 0) + np.where(heard, 0, old_undet)
    undet_new = tail_new | (unseen & det_new) | (~heard & old_new)
    pend = d.pend[idx] - k_r + detected
    # the next window
    ssth = d.ssth[idx]
    slow = cwnd < ssth
    reduce = detected_new & (phase != 2)
    i_c = np.where(det_new & ~unseen, np.minimum(i, k), 0).astype(float)  # in-order ACKs before the hole
    prior = cwnd + np.where(slow, i_c, i_c / np.maximum(cwnd, 1.0))
    new_ssth = np.maximum(prior / 2, MIN_SSTHRESH)
    released = np.minimum(np.where(slow, 2 * i_c, i_c), n - sent)  # new data sent before the hole was seen
    prr = np.maximum(dlv - i_c, 0) * new_ssth / prior
    w_recovery = np.maximum(np.round(released + prr), MIN_SSTHRESH)
    grown = _grow(cwnd, ssth, dlv, k)
    new_cwnd = np.where(reduce, new_ssth, np.where(phase == 1, ssth, grown))
    new_phase = np.where(reduce, 1, np.where(phase == 1, np.where(pend > 0, 1, 0), np.where(
        (phase == 2) & (pend == 0) & (undet == 0), 0, phase)))
    d.high[idx] = np.where(reduce, sent + released.astype(np.int64), d.high[idx])
    d.recoveries[idx] += reduce
    undet_new &= ~reduce  # this window's tail losses belong to the recovery just begun
    d.ssth[idx] = np.where(reduce, new_ssth, ssth)
    d.cwnd[idx] = new_cwnd
    d.w_next[idx] = np.maximum(1, np.where(reduce, w_recovery, np.floor(new_cwnd))).astype(np.int64)
    d.phase[idx] = new_phase
    # when the next flight leaves: with new data, when this one's first ACK is back or the
    # link is free; with only repairs left, when the last SACK is back (plus RACK's
    # reordering window min_rtt/4 when fewer than 3 segments were SACKed past the hole
    # and the sender was not in recovery yet)
    sacked_after = np.where(n_det > 0, after_hole, dlv)  # earlier holes: all of this flight is past them
    reo = np.where((sacked_after < 3) & (phase == 0), rtt / 4 + TLP_MIN_S, 0.0)
    t_next = np.where(sent < n, t + np.maximum(rtt, k * s), np.maximum(t + k * s, t + j * s + rtt + reo))
    d.t[idx] = t_next
    d.sent[idx] = sent
    d.pend[idx] = np.where(silent, 0, pend)
    d.undet[idx] = np.where(silent, undet + pend, undet)
    d.undet_new[idx] = undet_new
    d.clock_dead[idx] = ~heard
    d.backoff[idx] = np.where(heard, 0, d.backoff[idx])
    d.tlp_used[idx] &= ~heard


def _run_length(rng: np.random.Generator, p: float, size: int) -> np.ndarray:
    """How many of a row of Bernoulli(p) events come before the first that fails: P(>= m) = p^m."""
    if p <= 0:
        return np.zeros(size, np.int64)
    if p >= 1:
        return np.full(size, np.iinfo(np.int64).max // 4)
    return rng.geometric(1 - p, size) - 1


def _grow(cwnd: np.ndarray, ssth: np.ndarray, dlv: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Reno's window after a flight of k segments of which dlv were delivered: slow start
    while the flight used at least half the window (Linux's cwnd-limited test), then
    congestion avoidance (+1 per window, only when the window was full)."""
    slow = cwnd < ssth
    ss = np.minimum(cwnd + dlv, np.maximum(cwnd, 2.0 * k))
    over = np.maximum(ss - ssth, 0.0)  # segments acknowledged past ssthresh count for avoidance
    ss = np.where(ss > ssth, ssth + over / np.maximum(ssth, 1.0), ss)
    ca = cwnd + np.where(k >= np.floor(cwnd), dlv / np.maximum(cwnd, 1.0), 0.0)
    return np.where(slow, ss, ca)


def _timer(d: _Draws, idx: np.ndarray, path: TcpPath, rng: np.random.Generator) -> None:
    """Nothing arrives that could reveal the last holes: a tail loss probe, or the RTO."""
    s, rtt, ow = path.segment_s, path.rtt_s, path.one_way_s
    rto = rto_s(rtt)
    probe = (d.phase[idx] == 0) & ~d.tlp_used[idx]
    base = np.maximum(d.last_ack[idx], d.last_tx[idx])
    undet = d.undet[idx]
    pto = np.minimum(2 * rtt + np.where(undet == 1, RTO_MIN_S, TLP_MIN_S), rto)
    t_probe = base + _jiffies(pto)
    t_rto = base + rto * 2.0 ** d.backoff[idx]
    # -- the probe: the last segment again
    p = idx[probe]
    if p.size:
        tp = t_probe[probe]
        arrived = rng.random(p.size) >= path.loss_fwd
        d.retrans[p] += 1
        d.probes[p] += 1
        d.tlp_used[p] = True
        d.last_tx[p] = tp
        left = d.undet[p] - arrived
        d.last_deliv[p] = np.where(arrived, np.maximum(d.last_deliv[p], tp + path.last_segment_s + ow), d.last_deliv[p])
        # the probe repaired the only hole: CWR halves the window; else its SACK shows the others
        fixed = arrived & (left == 0)
        halved = np.maximum(d.cwnd[p] / 2, MIN_SSTHRESH)
        d.ssth[p] = np.where(arrived, halved, d.ssth[p])
        d.cwnd[p] = np.where(arrived, halved, d.cwnd[p])
        told = arrived & (left > 0) & (rng.random(p.size) >= path.loss_rev)
        d.undet[p] = np.where(told, 0, left)
        d.pend[p] = np.where(told, left, d.pend[p])
        d.phase[p] = np.where(told, 1, d.phase[p])
        d.high[p] = np.where(told, d.sent[p], d.high[p])
        d.recoveries[p] += told
        d.w_next[p] = np.where(told, np.minimum(left, 2),
                               np.where(fixed, np.maximum(1, np.floor(halved)), d.w_next[p])).astype(np.int64)
        d.t[p] = np.where(told, tp + rtt + rtt / 4 + TLP_MIN_S, np.where(fixed, tp + rtt, tp))
        d.last_ack[p] = np.where(told, tp + rtt, d.last_ack[p])
        d.clock_dead[p] = ~told & ~fixed
    # -- the retransmission timeout: cwnd 1, everything outstanding resent in slow start
    r = idx[~probe]
    if r.size:
        tr = t_rto[~probe]
        d.timeouts[r] += 1
        keep = d.phase[r] == 1  # Linux keeps ssthresh when the RTO hits during recovery
        d.ssth[r] = np.where(keep, d.ssth[r], np.maximum(d.cwnd[r] / 2, MIN_SSTHRESH))
        d.cwnd[r] = 1.0
        d.w_next[r] = 1
        d.pend[r] = d.undet[r]
        d.undet[r] = 0
        d.undet_new[r] = False
        d.phase[r] = 2
        d.high[r] = d.sent[r]
        d.backoff[r] += 1
        d.t[r] = tr
        d.clock_dead[r] = False


def path_for(payload_bytes: int, goodput_bps: float, mss_bytes: int, one_way_s: float, ack_one_way_s: float,
             loss_fwd: float, loss_rev: float) -> TcpPath:
    """The TcpPath of a message of `payload_bytes` on a link carrying `goodput_bps` of payload."""
    segments = math.ceil(payload_bytes / mss_bytes) if payload_bytes > 0 else 0
    seg = mss_bytes * 8 / goodput_bps
    last = (payload_bytes - (segments - 1) * mss_bytes) * 8 / goodput_bps if segments else 0.0
    return TcpPath(segments, seg, last, one_way_s, one_way_s + ack_one_way_s + seg, loss_fwd, loss_rev)
