"""Mixing strategies behind one protocol (`base.Strategy`), one module each:

- `static`: fixed weights over the bases (uniform, natural, importance sampling);
- `dga`: Dynamic Gradient Alignment every `every` (T_r) steps from fresh alignment batches;
- `inbatch`: DGA scored from the training step's own sequences (no backward per basis);
- `doge`: the DoGE baseline on DGA's alignment draw;
- `odm`: Online Data Mixing, the EXP3 bandit rewarded by each domain's training loss.

Each module has the strategy's settings as a frozen dataclass (`Static`, `DGA`, `InBatchDGA`, `DoGE`, `ODM`: what a
`Mixer` is given) and the strategy itself (`StaticStrategy`, ...: what the settings build on a stream, public for
those who wire the parts by hand). A strategy's `state_dict()` holds its counters, statistics, its target sampler's
position and the settings that shape its updates (loading it under other settings raises StateMismatchError); the
weights are the stream's, saved with the stream's state.
"""
from .base import Attachment, Evidence, Strategy, StrategySpec, UpdateRecord, own_rng
from .dga import DGA, DGAStrategy
from .doge import DoGE, DoGEStrategy
from .inbatch import InBatchDGA, InBatchDGAStrategy
from .odm import ODM, ODMStrategy, exp3_probabilities
from .static import Static, StaticStrategy

__all__ = ["Attachment", "DGA", "DGAStrategy", "DoGE", "DoGEStrategy", "Evidence", "InBatchDGA",
           "InBatchDGAStrategy", "ODM", "ODMStrategy", "Static", "StaticStrategy", "Strategy", "StrategySpec",
           "UpdateRecord", "exp3_probabilities", "own_rng"]
