"""The math layer: pure tensor functions, no I/O, no model. `core` holds the advantage estimators, policy losses,
KL penalties and loss aggregation (each formula in its docstring); `tis` the importance correction for samplers
with their own numerics."""
