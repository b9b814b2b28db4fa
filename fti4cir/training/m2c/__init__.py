"""M2C training (the method itself, its model and query path: `fti4cir.m2c`): `train` (stage I mapping, stage II
composing adapters, held-out recall; on the shared loop `fti4cir.training.loop`), `options` (the run's settings and
the official defaults), `losses` (official re-statement: `official`), `views` (seeded crops), `distributed` (one pool
of negatives over torchrun processes), `triplets` (stage-II data). See docs/m2c.md.
"""
