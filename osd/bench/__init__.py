"""``osd bench``: side-by-side benchmarks of AdamW, GaLore, GoLore and OSD.

One module per question, each with ``build_parser(parser)`` (its flags) and
``run(args, argv)``, which ``osd bench <name>`` calls (``osd.cli``) and which writes
``<name>.json`` and ``<name>.md`` (and PNGs) into ``--out``:

- :mod:`osd.bench.projection`: time of one update of ``P`` per projection rule;
- :mod:`osd.bench.step`: optimizer-step time and training throughput on the papers' presets;
- :mod:`osd.bench.quality`: the quality protocol: each method at its tuned lr on a small-vocabulary
  LLaMA, one pass over the C4 sample, several seeds, against the unigram entropy;
- :mod:`osd.bench.convergence`: a smoke test: validation perplexity on C4 with ``osd.train.train``
  (nano preset, t5 vocabulary: embeddings dominate, so it cannot rank the optimizers);
- :mod:`osd.bench.counterexample`: the GoLore paper's noisy quadratic, where GaLore stalls;
- :mod:`osd.bench.spread`: GaLore's SVD refresh steps under DDP, spread over the ranks or not.
"""

BENCHMARKS = ("projection", "step", "quality", "convergence", "counterexample", "spread")
