"""Build scripts for the shipped artifacts (not imported by the CLI).

Why a folder of their own: ``experiments/`` holds the drivers the ``apar-spec`` commands
call (bench, sweep, load-bench, quality, report); what is here runs once per release, to
rebuild the weights in ``apar_spec/models/`` and measure them for their cards:

- ``train_smollm2.py``: smollm2-apar and its drafts, stage by stage (``smollm2_data.py``:
  the base's answers; ``smollm2_fits.py``: the ``[Fork]`` row and the router;
  ``smollm2_drafts.py``: smollm2-draft, the heads, the token ranking; ``smollm2_facts.py``:
  ``train.json`` and the build log); ``train_embedded.py`` / ``measure_embedded.py``: the
  tiny models; ``draft_cost.py``: time inside ``propose`` per draft;
- ``smollm2_prompts.py`` / ``smollm2_draft_prompts.py``: our own training prompts, their
  literal lists in ``smollm2_prompts.json`` / ``smollm2_draft_prompts.json``;
- ``logs/``: dated notebooks and build facts (a build writes ``logs/<date>-<model>-build.md``;
  the model cards in ``apar_spec/models/*/README.md`` are kept by hand).
"""
