from dlkit.explain.attribution import Completeness, Explainer
