"""Synthesis strategies: what turns the seeds into the problems the run samples.

A strategy is one module in this package with one :class:`Strategy` subclass, registered with
``@register`` (``base.py``) and imported here (the import is the registration). The
``synthesize`` flow asks :func:`active` for the recipe's strategy (a recipe uses at most one;
``schemas.recipe.Recipe`` checks) and calls, in this order:

- ``ingest(recipe)``: the strategy's own seeds (GLAN: the taxonomy's subjects), or None for the
  recipe's ``seeds`` file;
- ``run(generator, recipe, seeds, lineage)`` -> :class:`Made`: its stages, by name and in order
  (each a ``StageResult``, counted in the manifest), and the problems to sample;
- ``label(samples, verdicts, recipe)``: columns it adds to a shard of verified samples
  (difficulty: the pass rate and its label), before scoring;
- ``lineage(recipe)``: its settings and prompt templates (the manifest's ``generator.<name>``
  and the OpenLineage events);
- ``stats(made, seeds, published)``: its entries in the manifest's ``stats``; ``published``
  holds the value counts of the published rows' ``published_columns``.

Every problem's own columns (its lineage: parent, chain, template) are joined to its samples by
the flow, whatever the strategy.
"""

from flows.strategies import difficulty, evolve, glan, self_instruct  # noqa: F401  (the registration)
from flows.strategies.base import REGISTRY, Made, Strategy, active, register, templates

__all__ = ["REGISTRY", "Made", "Strategy", "active", "register", "templates"]
