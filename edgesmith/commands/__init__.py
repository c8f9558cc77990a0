"""Commands that run one compression stage from a recipe: ``prune``, ``distill``, ``quantize``.

They sit above the build pipeline (they prepare a recipe's model and data, or run a build), so
they live here rather than in ``compress/``, which the pipeline imports. Each module holds one
command; ``edgesmith.cli.COMMANDS`` imports it on first use. Options that set a stage option are
made from the stage's config model (``options.field_option``), so their types and bounds are
the recipe's.
"""
