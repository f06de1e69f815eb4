"""scoretune: adversarial-training hyperparameter search implementing SCORE.

Pang et al., "Robustness and Accuracy Could Be Reconcilable by (Proper) Definition",
ICML 2022 (arXiv 2202.10103).

The math (``losses``, ``attacks``, ``bounds``, ``models``, ``data``) is plain torch/numpy;
``engine`` trains on top of it; Ray, Optuna and MLflow live at the edges
(``trainables``, ``search``, ``tracking``, ``cli``).
"""

__version__ = "0.1.0"
