"""A compromised device's MQTT client, for tests: started (by `spawn_in`) inside the
device's network namespace as root, it drops to the device's agent uid and then connects
with the device's own credentials but another client id — each of `identifiers` in turn,
holding each connection `hold_s` — or, with a last will on another device's status topic, one
connection that it leaves without a DISCONNECT (so the broker would publish the will).

Input: the JSON document in $TESTBED_ATTACK (the test's throwaway credentials; never on the
command line). Output: one JSON line on stdout, {identifier: "connected" | error}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import encodings.idna  # noqa: F401 - getaddrinfo encodes host names with it

import aiomqtt  # imported before the uid drop: the interpreter may live where a node uid cannot read

from testbed.emulation.node_uids import drop_privileges


async def _attack(a: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for ident in a["identifiers"]:
        will = aiomqtt.Will(a["will_topic"], b'{"state": "offline"}', qos=1, retain=True) if a.get("will_topic") else None
        client = aiomqtt.Client(a["host"], a["port"], username=a["username"], password=a["password"],
                                identifier=ident, will=will, keepalive=5, timeout=5)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as e:
            out[ident] = f"refused: {e}"
            continue
        out[ident] = "connected"
        await asyncio.sleep(a["hold_s"])
        if a.get("will_topic"):
            return out  # main() exits without a DISCONNECT: the broker publishes the will, if it accepted it
        await client.__aexit__(None, None, None)
    return out


def main() -> int:
    a = json.loads(os.environ["TESTBED_ATTACK"])
    loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.run_in_executor(None, lambda: None))  # its thread pool's modules, imported as root
    drop_privileges(int(a["uid"]))
    print(json.dumps(loop.run_until_complete(_attack(a))), flush=True)
    os._exit(0)  # no clean-up: a crashed client (its connections end without DISCONNECT)


if __name__ == "__main__":
    sys.exit(main())
