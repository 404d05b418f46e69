"""Priority classes: their order, and how the free batch slots are shared between them."""
from __future__ import annotations

import math

from sfllm.messages import PRIORITIES

PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}  # 0 is the highest


def split_slots(free_slots: int, normal_waiting: int, background_waiting: int, background_share: float) -> tuple[int, int]:
    """Slots for (normal, background) once high priority has taken its own.

    Each class gets its share when both wait, background's rounded down: normal outranks it,
    and aging bounds how long background waits. A class that waits for fewer slots than its
    share leaves the rest to the other."""
    if free_slots <= 0:
        return 0, 0
    background = min(background_waiting, math.floor(free_slots * background_share)) if normal_waiting else free_slots
    background = min(background, background_waiting)
    normal = min(normal_waiting, free_slots - background)
    background = min(background_waiting, free_slots - normal)
    return normal, background
