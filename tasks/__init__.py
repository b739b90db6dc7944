"""Prefect tasks and the plain glue functions they wrap (labelers/ and bayes_model/ <-> db/)."""
