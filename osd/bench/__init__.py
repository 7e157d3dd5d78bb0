"""``osd bench``: side-by-side benchmarks of AdamW, GaLore, GoLore and OSD.

One module per question, each with ``build_parser(parser)`` (its flags) and
``run(args, argv)``, which ``osd bench <name>`` calls (``osd.cli``) and which writes
``<name>.json`` and ``<name>.md`` (and PNGs) into ``--out``:

- :mod:`osd.bench.projection`: time of one update of ``P`` per projection rule;
- :mod:`osd.bench.step`: optimizer-step time and training throughput on the papers' presets;
- :mod:`osd.bench.convergence`: validation perplexity on C4 with ``osd.train.train``;
- :mod:`osd.bench.counterexample`: the GoLore paper's noisy quadratic, where GaLore stalls.
"""

BENCHMARKS = ("projection", "step", "convergence", "counterexample")
