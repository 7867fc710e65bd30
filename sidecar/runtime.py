"""What every VM and instance shares with the daemon around it, as one small bundle.

Owns nothing: it names the few daemon services guest work needs (host calls, the hand-over of
input reading, the output channel) so that VMs and isolates know them without knowing the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .hostcalls import HostCalls


@dataclass(frozen=True)
class Runtime:
    hostcalls: HostCalls
    yield_reading: Callable[[], None]  # hand input reading to another thread (work may be long)
    flush_answers: Callable[[], None]  # write what the reading thread has gathered, now
    wait_serving: Callable[[Callable[[], bool], float], None]  # wait for an answer, reading meanwhile
    send: Callable[[bytes], None]
