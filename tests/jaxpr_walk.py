"""Walking a jaxpr in tests: every equation, those inside loop bodies and conds included."""


def eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (loop bodies, conds, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from eqns(getattr(inner, "jaxpr", inner))
