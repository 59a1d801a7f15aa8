"""The wire of an impaired link: what `tc netem delay D loss P` does, in a process, for a kernel
built without netem (`CONFIG_NET_SCH_NETEM` is not set on the machine the suite runs on, and
there is no `fq` either to delay packets by their departure time).

`python -m tests.support.lossy_link TAP DELAY_MS LOSS SEED` opens the tap device TAP (in the
namespace it runs in), and for every frame the kernel hands it (`Network.impair` redirects
a link's IPv4 frames there with `tc ... action mirred`): drops it with probability LOSS,
else writes it back to the tap DELAY_MS later, where the kernel takes it on (FIFO: a fixed
delay keeps the order). It prints `ready` once the tap is open, runs until SIGTERM, and then
prints `frames forwarded=N dropped=M`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# More than any frame a 1500-byte MTU link carries (the tap gets no GSO super-frames: it
# offers no offloads, so the kernel segments before handing frames over).
FRAME_BYTES = 65536


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


async def relay(tap: str, delay_s: float, loss: float, seed: int) -> None:
    fd = open_tap(tap)
    rng = random.Random(seed)
    forwarded = dropped = 0
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def write(frame: bytes) -> None:
        # The tap went down (the link is being removed): the frame is lost.
        with contextlib.suppress(OSError):
            os.write(fd, frame)

    def on_readable() -> None:
        nonlocal forwarded, dropped
        while True:
            try:
                frame = os.read(fd, FRAME_BYTES)
            except BlockingIOError:
                return
            if rng.random() < loss:
                dropped += 1
            else:
                forwarded += 1
                loop.call_later(delay_s, write, frame)

    loop.add_reader(fd, on_readable)
    print("ready", flush=True)
    await stop.wait()
    loop.remove_reader(fd)
    os.close(fd)
    print(f"frames forwarded={forwarded} dropped={dropped}", flush=True)


def main(argv: list[str]) -> None:
    tap, delay_ms, loss, seed = argv
    asyncio.run(relay(tap, float(delay_ms) / 1000.0, float(loss), int(seed)))


if __name__ == "__main__":
    main(sys.argv[1:])
