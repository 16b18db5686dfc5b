"""The old-style listener, for comparison in mesh-bench.

As the Python listeners the mesh replaces: a core NATS subscription (no
JetStream, no acks) and one blocking HTTP POST per message with a new
connection each time (nats-py and requests, no session). mesh-bench installs
both into its own venv and runs this with NATS_URL, SUBJECT, HOOK_URL and
GATEWAY_TOKEN set; it prints "ready" once subscribed.
"""

import asyncio
import os

import nats
import requests


async def main() -> None:
    url = os.environ["HOOK_URL"]
    headers = {"Authorization": "Bearer " + os.environ["GATEWAY_TOKEN"]}
    client = await nats.connect(os.environ["NATS_URL"])

    async def forward(msg) -> None:
        # Blocking, one at a time, a new connection each time: the old way.
        text = "[mesh] " + msg.data.decode("utf-8", "replace")
        requests.post(url, json={"text": text, "mode": "now"}, headers=headers, timeout=30)

    await client.subscribe(os.environ["SUBJECT"], cb=forward, pending_msgs_limit=1_000_000)
    await client.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
