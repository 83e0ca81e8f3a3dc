#!/usr/bin/env python3
"""Counts the messages a NATS server routes, by kind of subject, in 5-s buckets.

Used by `scripts/bench scale --by-subject`: subscribes to `>` on the bench's
NATS server (which sees every client's publishes, JetStream API requests
included) until the file named by its second argument says "stop", then
prints one line per kind: its total, then its counts by 5 s from the first
chunk message. Kinds: KV reads (`get`), KV writes by key prefix
(`kv.sluice_state.rl` the limiter, `kv.sluice_state.cc` the window, ...), JetStream API requests by
verb, acks, chunk messages. Subscribing adds its own load, so the run's
other figures read a little worse than without it.
"""
import asyncio
import collections
import sys
import time

import nats


def kind(subject: str) -> str | None:
    parts = subject.split(".")
    if subject.startswith("$JS.EVENT") or subject.startswith("_INBOX"):
        return None  # the server's advisories and replies
    if subject.startswith("$JS.API.DIRECT.GET"):
        return "get"
    if subject.startswith("$JS.API"):
        return ".".join(parts[2:4]).lower()
    if subject.startswith("$KV"):
        # The shared state's keys by kind (rl: the limiter, cc: the window,
        # cb: breakers, ...); other buckets whole.
        return f"kv.{parts[1]}.{parts[2]}" if parts[1] == "sluice_state" and len(parts) > 2 else f"kv.{parts[1]}"
    if subject.startswith("$JS.ACK"):
        return "ack"
    return ".".join(parts[:2])


async def main(url: str, stop_file: str) -> None:
    nc = await nats.connect(url)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    start: list[float] = []

    async def seen(msg) -> None:
        k = kind(msg.subject)
        if k is None:
            return
        if not start and k == "sluice.chunks":
            start.append(time.monotonic())
        bucket = int((time.monotonic() - start[0]) // 5) if start else -1
        counts[k][bucket] += 1

    await nc.subscribe(">", cb=seen)
    while True:
        await asyncio.sleep(0.5)
        try:
            if open(stop_file).read().strip() == "stop":
                break
        except FileNotFoundError:
            pass
    await nc.drain()
    for k in sorted(counts, key=lambda k: -sum(counts[k].values())):
        by5 = counts[k]
        last = max(by5)
        series = ", ".join(str(by5.get(b, 0)) for b in range(0, last + 1))
        before = by5.get(-1, 0)
        print(f"{k:<28} {sum(by5.values()):>7}  (before the first chunk {before}; by 5 s: [{series}])")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
