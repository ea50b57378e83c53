"""Built-in pre/post-processing plugins (see :mod:`stages.plugins` for the interface).

- :class:`processors.tabular.NamedFeatures` (``named_features``): a parse hook that builds a
  model's input vector from features given by name.
- :class:`processors.tabular.DecisionThreshold` (``decision_threshold``): a postprocess hook
  that names the label by a threshold on one class's score.

Both are registered in the ``streaminfer.processors`` entry-point group under the names in
brackets; a ``model.yaml`` may also name them by path (``processors.tabular:NamedFeatures``).
"""
