"""osd: memory-efficient LLM training with gradient-subspace optimizers.

Online Subspace Descent (online PCA), GaLore (SVD) and GoLore (random) projections, each
with AdamW, Lion, Adafactor or SGD-momentum inside the subspace, as ``torch.optim``
optimizers. See the README for usage.
"""

from osd import quiet

quiet.install()  # before anything imports transformers / torchao

from osd.layerwise import LayerwiseUpdates
from osd.memory import state_bytes
from osd.optimizer import SubspaceOptimizer
from osd.param_groups import param_groups
from osd.presets import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreLion,
    GaLoreSGD,
    GoLoreAdamW,
    GoLoreLion,
    OSDAdafactor,
    OSDAdamW,
    OSDAdamW8bit,
    OSDLion,
    OSDSGD,
    create_optimizer,
    optimizer_names,
)

__version__ = "0.1.0"

__all__ = [
    "SubspaceOptimizer",
    "LayerwiseUpdates",
    "OSDAdamW",
    "GaLoreAdamW",
    "GoLoreAdamW",
    "OSDLion",
    "GaLoreLion",
    "GoLoreLion",
    "OSDAdafactor",
    "GaLoreAdafactor",
    "OSDSGD",
    "GaLoreSGD",
    "GaLoreAdamW8bit",
    "OSDAdamW8bit",
    "create_optimizer",
    "optimizer_names",
    "param_groups",
    "state_bytes",
]
