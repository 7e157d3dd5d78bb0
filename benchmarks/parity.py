"""Parity figures: how far ``osd`` is from the reference implementations, on the update.

    python benchmarks/parity.py

For every configuration of ``tests/test_parity.py`` prints ``||W - W_ref|| / ||W_ref - W_0||``
(and the same for ``P``): ``GaLoreAdamW`` / ``GaLoreAdafactor`` against ``galore_torch`` 1.0
at its defaults (needs ``pip install -e .[test]``), ``compat="osd_release"`` against the
released OSD behaviour (``tests/reference_osd_release.py``). Run from the repository root.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import galore_torch  # noqa: E402

from tests import parity_cases as cases  # noqa: E402


def main() -> None:
    warnings.simplefilter("ignore")
    rows = []
    for shape in cases.SHAPES:
        for proj_type in cases.PROJ_TYPES:
            for wd in (0.0, 0.1):
                weight, full = cases.galore_adamw_errors(galore_torch, shape, proj_type, wd)
                rows.append((f"GaLoreAdamW vs galore_torch {shape} {proj_type} wd={wd}", weight, full))
        for beta1 in (None, 0.9):
            for wd in (0.0, 0.1):
                rows.append((f"GaLoreAdafactor vs galore_torch {shape} beta1={beta1} wd={wd} (float64)", cases.galore_adafactor_error(galore_torch, shape, beta1, wd), None))
    for rule in ("adamw", "lion"):
        for shape in [(40, 96), (96, 40)]:
            weight, proj, _ = cases.osd_release_errors(rule, shape)
            rows.append((f"OSD {rule} compat=osd_release vs released code {shape} (float64)", weight, proj))
    width = max(len(name) for name, *_ in rows)
    print(f"{'configuration':<{width}}  {'error on W':>10}  {'other':>10}")
    for name, first, second in rows:
        print(f"{name:<{width}}  {first:10.2e}  {'' if second is None else f'{second:10.2e}':>10}")
    print(f"max error on W: {max(r[1] for r in rows):.2e}; other = the full-rank vector (GaLore) or P (OSD)")


if __name__ == "__main__":
    main()
