"""Ablation: the recipe without KoLeo, not private (seed 0).

Isolates KoLeo's share of the DP rows' accuracy drop (docs/differential-privacy.md).
"""

import json
from dataclasses import replace

from smsd.experiments import SimulateConfig, simulate

cfg = SimulateConfig(methods=("smsd",), membership=True).with_seed(0)
pretrain = replace(cfg.recipe.pretrain, koleo_weight=0.0)
cfg = replace(cfg, recipe=replace(cfg.recipe, pretrain=pretrain))
res = simulate(cfg, "/work/dp-runs/nokoleo-seed-0", progress=False)
print(json.dumps(res[0].row()))
