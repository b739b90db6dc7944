"""bayes_model."""
