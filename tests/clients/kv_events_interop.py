"""KV events against a real ZeroMQ (pyzmq, libzmq) and the engines' msgspec encoding.

1. The simulator's publisher, read by a pyzmq SUB socket and decoded with msgspec into the
   event classes vLLM and SGLang define (the same field layout), and its replay socket asked
   through a pyzmq DEALER.
2. The router's subscriber, fed by a pyzmq publisher that encodes like vLLM (bytes block
   hashes, as vLLM's SHA-256 hashing sends them) with a ROUTER replay socket: the router
   indexes the blocks and repairs a sequence gap from the replay socket.

Usage: kv_events_interop.py SWITCHYARD_BIN SWITCHYARD_SIM_BIN
"""

import faulthandler
import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Optional, Union

import msgspec
import zmq
from procs import stop

# The engines' wire types (field order and options are the format; see vLLM's
# vllm/distributed/kv_events.py and SGLang's kv_events.py).


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[Union[int, bytes]]
    parent_block_hash: Union[int, bytes, None]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]


class BlockRemoved(KVCacheEvent):
    block_hashes: list[Union[int, bytes]]
    medium: Optional[str]


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]


DEADLINE = 20.0
# Nothing here may hang CI: past this the stacks are printed and the script exits non-zero.
WATCHDOG = 240


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def wait_until(what, check):
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def sim_side(sim_bin, ctx):
    sim = start([sim_bin, "--base-port", "0", "--kv-events-port", "0", "--kv-events-replay-port", "0",
                 "--time-scale", "100"])
    sockets = []
    try:
        line = sim.stdout.readline()
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        url = line.split()[0]
        sub = ctx.socket(zmq.SUB)
        sockets.append(sub)
        sub.connect(fields["kv_events"])
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        got = None
        prompts = []
        end = time.monotonic() + DEADLINE
        # The SUB socket joins asynchronously: ask again until a batch arrives. Each try sends a new
        # prompt (two full 16-token blocks; the 40th token is not cached), since a prompt already
        # cached stores nothing and so publishes nothing.
        while got is None and time.monotonic() < end:
            prompt = list(range(1000 * (len(prompts) + 1), 1000 * (len(prompts) + 1) + 40))
            prompts.append(prompt)
            http("POST", f"{url}/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1}})
            if sub.poll(500):
                topic, seq, payload = sub.recv_multipart()
                got = (int.from_bytes(seq, "big"), decoder.decode(payload))
        assert got is not None, "no KV event batch from the simulator"
        seq, batch = got
        stored = [e for e in batch.events if isinstance(e, BlockStored)]
        assert stored, batch
        ev = stored[0]
        assert ev.block_size == 16 and ev.parent_block_hash is None, ev
        assert len(ev.block_hashes) == 2, ev
        assert any(ev.token_ids == p[:32] for p in prompts), ev

        dealer = ctx.socket(zmq.DEALER)
        sockets.append(dealer)
        dealer.connect(fields["kv_events_replay"])
        dealer.send_multipart([b"", seq.to_bytes(8, "big")])
        replayed = []
        while dealer.poll(5000):
            _, rseq, payload = dealer.recv_multipart()
            if not payload:
                assert int.from_bytes(rseq, "big", signed=True) == -1
                break
            replayed.append((int.from_bytes(rseq, "big"), decoder.decode(payload)))
        assert replayed and replayed[0][0] == seq and replayed[0][1] == batch, replayed[:1]
        print(f"simulator -> pyzmq: batch {seq} decoded as vLLM's KVEventBatch; replay returned it")
    finally:
        for socket in sockets:
            socket.close(linger=0)
        stop(sim)


def block_hash(parent: bytes, tokens) -> bytes:
    return hashlib.sha256(parent + json.dumps(tokens).encode()).digest()


def router_side(router_bin, sim_bin, ctx):
    pub = ctx.socket(zmq.XPUB)  # a PUB that also says when a subscriber has joined
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    # A ZeroMQ socket belongs to one thread: the replay thread creates, serves and closes its
    # own ROUTER socket (closing it from here while it blocks in recv can hang libzmq's term).
    replay_bound = threading.Event()
    done = threading.Event()
    replay_port = []
    encoder = msgspec.msgpack.Encoder()
    buffered = {}

    def serve_replay():
        replay = ctx.socket(zmq.ROUTER)
        try:
            replay_port.append(replay.bind_to_random_port("tcp://127.0.0.1"))
            replay_bound.set()
            while not done.is_set():
                if not replay.poll(100):
                    continue
                ident, _, start = replay.recv_multipart()
                first = int.from_bytes(start, "big")
                for s in sorted(k for k in list(buffered) if k >= first):
                    replay.send_multipart([ident, b"", s.to_bytes(8, "big"), buffered[s]])
                replay.send_multipart([ident, b"", (-1).to_bytes(8, "big", signed=True), b""])
        finally:
            replay.close(linger=0)

    replayer = threading.Thread(target=serve_replay, daemon=True)
    replayer.start()
    assert replay_bound.wait(DEADLINE), "the replay socket was not bound"
    replay_port = replay_port[0]

    sim = start([sim_bin, "--base-port", "0", "--time-scale", "100"])
    sim_url = sim.stdout.readline().split()[0]
    router = subprocess.Popen(
        [router_bin, "--host", "127.0.0.1", "--port", "0", "--worker-urls", sim_url, "--policy", "cache_aware",
         "--kv-events-endpoint", f"tcp://127.0.0.1:{pub_port}",
         "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{replay_port}", "--log-level", "warn"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = router.stdout.readline()
        assert line.startswith("switchyard listening on "), line
        router_url = line.split()[3]
        # The router's subscription arrives as an XPUB message (b"\x01" + topic).
        assert pub.poll(int(DEADLINE * 1000)), "the router never subscribed"
        assert pub.recv()[:1] == b"\x01"

        def publish(seq, events, send=True):
            payload = encoder.encode(KVEventBatch(ts=time.time(), events=events))
            buffered[seq] = payload
            if send:
                pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

        tokens = list(range(64))
        h = [b"\x00" * 32]
        for i in range(4):
            h.append(block_hash(h[-1], tokens[16 * i:16 * i + 16]))
        publish(0, [BlockStored(h[1:3], None, tokens[:32], 16, None, "GPU")])
        # Seq 1 never reaches the live stream: the router must fetch it from the replay socket.
        publish(1, [BlockStored(h[3:5], h[2], tokens[32:64], 16, None, "GPU")], send=False)
        publish(2, [BlockRemoved([h[4]], "GPU")])

        def view():
            report = http("GET", f"{router_url}/debug/kv_events")
            return report["workers"][0]

        v = wait_until("the gap repaired", lambda: (w := view())["last_seq"] == 2 and w)
        assert v["gaps_replayed"] == 1 and v["gaps_cold"] == 0, v
        assert v["blocks"] == 3 and v["block_size"] == 16 and v["synced"], v
        print(f"pyzmq (vLLM encoding, bytes hashes) -> router: {v['blocks']} blocks, gap repaired by replay")
    finally:
        stop(router)
        stop(sim)
        done.set()
        replayer.join(DEADLINE)
        pub.close(linger=0)


def main():
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    router_bin, sim_bin = sys.argv[1], sys.argv[2]
    ctx = zmq.Context()
    sim_side(sim_bin, ctx)
    router_side(router_bin, sim_bin, ctx)
    # Every socket was closed by the thread that used it, so this cannot wait on one.
    ctx.term()
    print("kv events interop: ok")


if __name__ == "__main__":
    main()
