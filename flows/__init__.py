"""Prefect flows: the retrain pipeline and its schedules (imports opsd_core, never the reverse)."""
