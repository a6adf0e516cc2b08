"""Geo: the service's countries, states and counties, refreshed daily into reference tables.

  tables   how each of the service's lists maps onto its table, and the upsert
  refresh  one run: what is in scope (GEO_COUNTRIES, GEO_STATES), fetched within GEO_CONCURRENCY
  jobs     the Celery entry point (`tasks.geo.refresh_geo_data`, name unchanged)

Imported here so that the app's `include` registers the task.
"""

from tasks.geo import jobs

__all__ = ["jobs"]
