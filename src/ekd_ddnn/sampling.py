"""The depths each training step trains under lattice sampling (the sandwich rule).

Slimmable / US-Nets and BigNAS train the largest and the smallest network and a few random
ones in every step; here, the full-net (the teacher), the smallest depth of the lattice and
``num_sampled`` further depths drawn uniformly without replacement from the rest. The draw is
a pure function of ``(seed, step)``: the same on every DDP rank, the same after a resume, and
independent of data order and worker count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ekd_ddnn.errors import UserError

Depth = tuple[int, ...]


def check_num_sampled(lattice: Sequence[Depth], num_sampled: int) -> None:
    """``num_sampled`` fits the lattice (full-net and smallest depth excluded)."""
    rest = len(lattice) - 2
    if num_sampled > rest:
        raise UserError(
            f"ekd.num_sampled={num_sampled} but the depth lattice holds only {rest} depths "
            f"besides the full-net and the smallest; use at most {rest}"
        )


def sample_depths(
    lattice: Sequence[Depth], num_sampled: int, *, seed: int, step: int
) -> list[Depth]:
    """The depths of step ``step``: ``lattice[0]`` (the full-net), ``lattice[-1]`` (the
    smallest), then ``num_sampled`` others in lattice order."""
    full, smallest, rest = lattice[0], lattice[-1], list(lattice[1:-1])
    check_num_sampled(lattice, num_sampled)
    rng = np.random.default_rng([seed % 2**32, step])  # SeedSequence: a pure function of both
    picked = sorted(rng.choice(len(rest), size=num_sampled, replace=False).tolist())
    return [full, smallest, *(rest[i] for i in picked)]
