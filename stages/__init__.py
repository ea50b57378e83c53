"""Stage runtime and the three stages (validate, infer, persist).

The contract is documented once, on :mod:`stages.runtime`.
"""
